"""Reconciliation: match a processor's settlement report against the ledger.

A settlement report says what the processor actually moved; the ledger
(payments/ledger.py) says what we booked. This module reads a report into
in-memory records (:func:`parse_stripe_report`, :func:`parse_adyen_report`),
compares them with the ledger's journals (:func:`reconcile`, a pure function),
loads those journals from PostgreSQL (:func:`load_ledger_entries`) and stores
each run (:func:`store_run`, tables ``reconciliation_runs`` and
``reconciliation_items`` of migration ``0010_reconciliation.sql``).
``switchboard reconcile`` (switchboard/reconcile_cli.py) drives all of it.

Amounts
-------
Reports give amounts as decimal numbers in **major units** (``10.50`` EUR).
They are converted to integer **minor units** of the ISO 4217 currency with
:class:`decimal.Decimal` (never floats), using the currency's ISO 4217
exponent from the ``iso4217`` package: 2 for EUR/USD, 0 for JPY/KRW/ISK,
3 for BHD/KWD, 4 for CLF. A value with more decimals than its currency has
(``10.505`` EUR) is an error, not a rounding. Every amount below is in minor
units, oriented the way the ledger books it: a capture of 10.50 EUR and a
refund of 10.50 EUR are both ``1050``; a reversal is negative.

What a report line is matched with
----------------------------------
Each relevant report line becomes a :class:`ReportLine`: a journal ``kind``
(``capture`` or ``refund``), an amount and currency, the fees the processor
withheld on it, and an ordered tuple of candidate **references**. The ledger
side is one :class:`LedgerEntry` per capture/refund/fee journal that touches
``processor_clearing:<processor>``; its amount is what the journal moved on
that clearing account (capture ``+A``, refund ``-R`` and fee ``-F`` are all
read back as ``A``, ``R``, ``F``).

**Reference rule.** A line's reference is the *first candidate that names a
ledger journal of the same kind*; when none does, the first non-empty
candidate (and the line is then missing in the ledger). Lines are grouped by
``(kind, reference)`` and their amounts summed per currency; the group is
compared with the sum of the ledger journals of the same ``(kind,
reference)``:

- same amounts in the same currencies -> ``matched``;
- different amount or currency -> ``conflicted`` (Hyperswitch's word for it;
  both sides are kept);
- no such journal -> ``missing_in_ledger``;
- a capture/refund journal of this processor created inside the report's
  period ``[period_start, period_end)`` that no line matched ->
  ``missing_in_report``. (The period is the span of the report's row times
  unless the caller passes one. Stripe's balance report lists all activity
  of its interval, so the rule is exact there up to webhook delay; an Adyen
  settlement batch may leave out captures of its span that settle in a
  later batch, so pass the batch's own period or reconcile consecutive
  batches together.)

Summing per group is what makes a Stripe partial capture (a ``charge`` line
for the authorized amount plus a ``partial_capture_reversal`` line for the
uncaptured rest) match the one capture journal of the captured amount, and
what turns a duplicated line into a conflict instead of a silent match.

What reference the ledger stores (the convention the payment worker follows):

- **Stripe**: a capture journal's reference is the PaymentIntent id
  (``pi_...``, our ``processor_reference``); a refund's is the Refund id
  (``re_...``); a fee's is the PaymentIntent id. Stripe's balance reports list
  the balance transaction's ``source_id`` (the Charge ``ch_...``/``py_...`` of
  a charge, the Refund ``re_...`` of a refund) and, in the itemized report,
  ``payment_intent_id`` and ``charge_id`` when those columns are selected.
  Candidates: for ``charge`` and ``partial_capture_reversal`` lines
  ``payment_intent_id``, ``charge_id``, ``source_id``; for ``refund`` and
  ``refund_failure`` lines ``refund_id``, ``source_id``, ``payment_intent_id``,
  ``charge_id`` (columns that are absent or empty are left out). A ledger
  that booked charges under ``ch_...`` therefore still matches.
- **Adyen**: a capture journal's reference is the payment's pspReference (our
  ``processor_reference``); a refund's is the refund's own pspReference (what
  ``POST /payments/{pspReference}/refunds`` answers). Candidates: for
  ``Settled`` lines ``Psp Reference``, ``Modification Reference``; for
  ``Refunded``/``RefundedReversed`` lines ``Modification Reference``,
  ``Psp Reference``.

**Fees** are not matched line by line: the report's fees are summed per
currency (per-line fees plus standalone fee lines) and compared with the sum
of the ledger's fee journals of this processor whose reference is one of the
report's references: a line's candidates, or a fee's own reference
(:func:`fee_reference`, under which :func:`post_report_fees` posts it). A fee
journal's time says when it was booked, not when the processor took the fee,
so the period plays no part here. When the ledger holds no such fee journal
at all, fees are reported but not compared (:attr:`FeeTotal.ledger_minor` is
None) and are no discrepancy.

**Fee journals.** Importing a report (:func:`reconcile_and_store`) posts its
fees as ledger journals of kind ``fee`` once the comparison is made, one per
fee reference (idempotency key ``fee:<processor>:<reference>``): Stripe's
``fee`` of a balance transaction and standalone ``fee`` lines, Adyen's
commission + markup + scheme fees + interchange and its ``Fee`` /
``MiscCosts`` / ``PaymentCost`` lines. A second import of the same report
posts nothing more; a fee whose reference was posted with another amount is
left as it is and shows as a fee mismatch.

**Skipped**: rows of any other type (payouts, disputes, adjustments,
transfers...) are counted per type in :attr:`ParsedReport.skipped`; they are
not errors and contribute nothing. A malformed relevant row raises
:class:`ReportError` naming the line number (1 is the header; a quoted field
spanning lines counts every physical line) and the column.

Output is deterministic: items are ordered by outcome (conflicted,
missing_in_ledger, missing_in_report, matched), then kind, then reference.

Report formats (sources)
------------------------
**Stripe** "Balance change from activity" itemized report
(``balance_change_from_activity.itemized.1/2/3``; the Dashboard's Balance
report download). Columns per https://docs.stripe.com/reports/report-types
(section Balance): ``balance_transaction_id``, ``created_utc``, ``created``,
``available_on_utc``, ``currency`` (lower case), ``gross``, ``fee``, ``net``
("expressed in major units of the currency", ``net = gross - fee``),
``reporting_category``, ``source_id``, ``description``, and the optional
itemized columns ``charge_id`` and ``payment_intent_id`` (a ``refund_id``
column is used too when a report has one). Categories per
https://docs.stripe.com/reports/reporting-categories: ``charge`` (capture,
amount = gross), ``partial_capture_reversal`` (capture, amount = gross, which
is negative), ``refund`` (refund, amount = -gross), ``refund_failure``
(refund, amount = -gross, negative), ``fee`` (a standalone fee: -net);
everything else (``payout``, ``dispute``, ``transfer``, ``other_adjustment``...)
is skipped. The per-line fee is the ``fee`` column (withheld from the
balance; https://docs.stripe.com/api/balance_transactions/object). Times:
``created_utc`` (UTC) when present, else ``created`` read as UTC (the report's
default time zone).

**Adyen** Settlement details report
(https://docs.adyen.com/reporting/settlement-detail-report and its structure
page https://docs.adyen.com/developers/reporting/settlement-detail-report/settlement-detail-report-structure):
``Company Account``, ``Merchant Account``, ``Psp Reference``, ``Merchant
Reference``, ``Payment Method``, ``Creation Date`` (``YYYY-MM-DD HH:MM:SS``),
``TimeZone`` (``CET``, ``CEST``, ``BST``...), ``Type``, ``Modification
Reference``, ``Gross Currency``, ``Gross Debit (GC)``, ``Gross Credit (GC)``,
``Exchange Rate``, ``Net Currency``, ``Net Debit (NC)``, ``Net Credit (NC)``,
``Commission (NC)``, ``Markup (NC)``, ``Scheme Fees (NC)``, ``Interchange
(NC)``, ``Payment Method Variant``, ``Modification Merchant Reference``,
``Batch Number``. Types: ``Settled`` (capture, amount = gross credit - gross
debit, in the Gross Currency), ``Refunded`` and ``RefundedReversed`` (refund,
amount = gross debit - gross credit), ``Fee``, ``MiscCosts``, ``PaymentCost``
(standalone fees: net debit - net credit in the Net Currency); everything
else (``MerchantPayout``, ``Chargeback``, ``DepositCorrection``,
``InvoiceDeduction``, ``SettledBulk``...) is skipped. The per-line fee is
Commission + Markup + Scheme Fees + Interchange in the Net Currency (in
Adyen's sample, 5.00 GBP settled at 4.88 with 0.04 + 0.01 + 0.07).
"""

from __future__ import annotations

import csv
import enum
import hashlib
import json
import re
import uuid
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import iso4217
import uuid6

from payments.ledger import (
    MAX_IDEMPOTENCY_KEY_CHARS,
    MAX_REFERENCE_CHARS,
    IdempotencyConflict,
    JournalKind,
    JournalRequest,
    fee_postings,
    post_journals,
    processor_clearing,
)
from switchboard.db.pool import Connection

#: ``(currency, amount in minor units)`` pairs, sorted by currency, zero totals left out.
Amounts = tuple[tuple[str, int], ...]


class ReportError(ValueError):
    """A settlement report cannot be read.

    ``line`` is the 1-based physical line of the file (1 is the header),
    ``column`` the column at fault (None when the whole row or file is).
    """

    def __init__(self, line: int, column: str | None, message: str) -> None:
        self.line = line
        self.column = column
        self.reason = message
        where = f"line {line}" + (f", column {column!r}" if column else "")
        super().__init__(f"{where}: {message}")


class ReportFormat(enum.StrEnum):
    """The settlement report formats :func:`parse_report` reads."""

    STRIPE = "stripe"  # balance change from activity, itemized
    ADYEN = "adyen"  # Settlement details report


class Outcome(enum.StrEnum):
    """What reconciliation found for one ``(kind, reference)``."""

    CONFLICTED = "conflicted"  # in both, different amount or currency
    MISSING_IN_LEDGER = "missing_in_ledger"  # in the report only
    MISSING_IN_REPORT = "missing_in_report"  # in the ledger (inside the period) only
    MATCHED = "matched"


_OUTCOME_ORDER = {outcome: rank for rank, outcome in enumerate(Outcome)}
_MATCHED_KINDS = (JournalKind.CAPTURE, JournalKind.REFUND)


# --- amounts -----------------------------------------------------------------------------------------

_DECIMAL_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")


def currency_exponent(currency: str) -> int:
    """The ISO 4217 exponent (number of minor-unit digits) of ``currency`` (upper or lower case).

    2 for EUR, 0 for JPY, 3 for BHD. Raises ``ValueError`` for a code that is
    not in ISO 4217 or has no minor unit (XAU, XXX).
    """
    try:
        exponent = iso4217.Currency(currency.upper()).exponent
    except ValueError:
        raise ValueError(f"{currency!r} is not an ISO 4217 currency code") from None
    if exponent is None:
        raise ValueError(f"ISO 4217 currency {currency.upper()} has no minor unit")
    return exponent


def to_minor_units(value: str, currency: str) -> int:
    """``value`` (a decimal string in major units, e.g. ``"-10.50"``) as integer minor units of ``currency``.

    Exact: uses :class:`~decimal.Decimal`; ``"10.50"`` EUR is 1050, ``"500"``
    JPY is 500, ``"1.234"`` BHD is 1234. Raises ``ValueError`` for anything
    that is not a plain decimal number (no exponent, no thousands separator),
    for more decimals than the currency has, and for an unknown currency.
    """
    text = value.strip()
    if not _DECIMAL_RE.fullmatch(text):
        raise ValueError(f"{value!r} is not a decimal number")
    exponent = currency_exponent(currency)
    try:
        minor = Decimal(text).scaleb(exponent)
    except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
        raise ValueError(f"{value!r} is not a decimal number") from None
    if minor != minor.to_integral_value():
        raise ValueError(f"{text} has more decimals than {currency.upper()}'s {exponent}")
    return int(minor)


def _totals(pairs: Iterable[tuple[str, int]]) -> Amounts:
    sums: dict[str, int] = defaultdict(int)
    for currency, amount in pairs:
        sums[currency] += amount
    return tuple(sorted((c, a) for c, a in sums.items() if a != 0))


def format_amounts(amounts: Amounts) -> str:
    """``"1050 EUR"``, ``"1050 EUR + 20 USD"`` or ``"0"`` (minor units)."""
    return " + ".join(f"{amount} {currency}" for currency, amount in amounts) or "0"


# --- records -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportLine:
    """One capture or refund line of a settlement report.

    ``line`` is the physical line it starts on. ``references`` are the
    candidates, preferred first (see "Reference rule"), never empty.
    ``amount_minor`` is in minor units of ``currency``, oriented like the
    ledger (a capture and a refund are both positive; a reversal negative).
    ``fee_minor`` is what the processor withheld on this line, in minor units
    of ``fee_currency`` (0 and ``""`` when none). ``category`` is the
    report's own type (``charge``, ``Settled``...), ``line_id`` its own id of
    the line (Stripe ``balance_transaction_id``, Adyen ``Modification
    Reference``) or ``""``.
    """

    line: int
    kind: JournalKind
    references: tuple[str, ...]
    amount_minor: int
    currency: str
    occurred_at: datetime
    category: str
    fee_minor: int = 0
    fee_currency: str = ""
    line_id: str = ""


@dataclass(frozen=True)
class FeeLine:
    """A standalone fee line of a report: ``amount_minor`` (> 0 is a fee charged) of ``currency``;
    ``line_id`` is the report's own id of the line (Stripe ``balance_transaction_id``, else
    ``source_id``; Adyen ``Modification Reference``, else ``Psp Reference``) or ``""``."""

    line: int
    amount_minor: int
    currency: str
    occurred_at: datetime
    category: str
    line_id: str = ""


@dataclass(frozen=True)
class ParsedReport:
    """A settlement report read into memory.

    ``rows`` counts the data rows (header and blank lines excluded);
    ``skipped`` maps each ignored row type to its count (sorted by type).
    ``period_start`` is the earliest row time and ``period_end`` one second
    after the latest (report times have whole-second precision), so the
    period ``[period_start, period_end)`` covers every row; both None for a
    report without rows.
    """

    format: ReportFormat
    rows: int
    lines: tuple[ReportLine, ...]
    fee_lines: tuple[FeeLine, ...]
    skipped: tuple[tuple[str, int], ...]
    period_start: datetime | None
    period_end: datetime | None

    def references(self) -> set[str]:
        """What to look up in the ledger: every candidate reference of every line, and the
        reference of every fee (:func:`fee_reference`), under which its fee journal is posted."""
        return {reference for line in self.lines for reference in line.references} | self.fee_references()

    def fee_references(self) -> set[str]:
        """The :func:`fee_reference` of every fee of the report (lines with a fee, fee lines)."""
        fees: list[ReportLine | FeeLine] = [*self.lines, *self.fee_lines]
        return {r for r in map(fee_reference, fees) if r is not None}


def fee_reference(line: ReportLine | FeeLine) -> str | None:
    """The processor's reference of a fee: the reference its fee journal is posted under.

    The report's own id of the line (Stripe ``balance_transaction_id``: one balance transaction,
    one fee; Adyen ``Modification Reference``); without one, a capture or refund line falls back
    to ``<category>:<its first reference>`` (e.g. ``charge:pi_1``) and a standalone fee line has
    none (None: it cannot be posted idempotently). None too for a line without a fee.
    """
    if isinstance(line, ReportLine):
        if not line.fee_minor:
            return None
        return line.line_id or f"{line.category}:{line.references[0]}"
    if not line.amount_minor:
        return None
    return line.line_id or None


@dataclass(frozen=True)
class LedgerEntry:
    """A ledger journal as reconciliation sees it.

    ``amount_minor`` is what the journal moved on the processor's clearing
    account in ``currency``, oriented like the journal kind (capture: the
    debit, refund and fee: the credit, each read as positive). A journal
    touching the clearing account in two currencies gives two entries.
    """

    journal_id: uuid.UUID
    sequence: int
    kind: JournalKind
    reference: str
    amount_minor: int
    currency: str
    created_at: datetime
    payment_id: uuid.UUID | None = None


@dataclass(frozen=True)
class ReconciliationItem:
    """The outcome for one ``(kind, reference)``.

    ``report`` and ``ledger`` are the summed amounts of each side (minor
    units per currency; empty when that side has nothing). ``lines`` are the
    report's line numbers, ``journal_ids`` the ledger journals (chain order).
    ``detail`` says what differs, for people.
    """

    outcome: Outcome
    kind: JournalKind
    reference: str
    report: Amounts
    ledger: Amounts
    lines: tuple[int, ...] = ()
    journal_ids: tuple[uuid.UUID, ...] = ()
    detail: str = ""


@dataclass(frozen=True)
class FeeTotal:
    """Fees in one currency (minor units): the report's sum and the ledger's (None when not booked)."""

    currency: str
    report_minor: int
    ledger_minor: int | None

    @property
    def ok(self) -> bool:
        """True when the ledger books no fees at all or books exactly the report's."""
        return self.ledger_minor is None or self.ledger_minor == self.report_minor

    @property
    def difference_minor(self) -> int:
        """Report minus ledger (0 when not compared)."""
        return 0 if self.ledger_minor is None else self.report_minor - self.ledger_minor


@dataclass(frozen=True)
class ReconciliationResult:
    """Everything one reconciliation found; ``items`` in the documented deterministic order."""

    format: ReportFormat
    rows: int
    items: tuple[ReconciliationItem, ...]
    fees: tuple[FeeTotal, ...]
    skipped: tuple[tuple[str, int], ...]
    period_start: datetime | None
    period_end: datetime | None
    _by_outcome: dict[Outcome, tuple[ReconciliationItem, ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        for outcome in Outcome:
            self._by_outcome[outcome] = tuple(i for i in self.items if i.outcome is outcome)

    def of(self, outcome: Outcome) -> tuple[ReconciliationItem, ...]:
        """The items with ``outcome``, in result order."""
        return self._by_outcome[outcome]

    @property
    def counts(self) -> dict[Outcome, int]:
        """How many items of each outcome (every outcome present, 0 included)."""
        return {outcome: len(self._by_outcome[outcome]) for outcome in Outcome}

    @property
    def fee_mismatches(self) -> tuple[FeeTotal, ...]:
        """The fee totals that the ledger books differently from the report."""
        return tuple(fee for fee in self.fees if not fee.ok)

    @property
    def discrepancies(self) -> int:
        """Items that are not matched plus fee currencies that differ."""
        return len(self.items) - len(self._by_outcome[Outcome.MATCHED]) + len(self.fee_mismatches)

    @property
    def ok(self) -> bool:
        """True when every line matched, nothing is missing and the fees agree."""
        return self.discrepancies == 0


# --- reading CSV -------------------------------------------------------------------------------------


class _Row:
    """One CSV record with the header's column positions (names compared case-insensitively)."""

    def __init__(self, line: int, values: list[str], columns: Mapping[str, int]) -> None:
        self.line = line
        self._values = values
        self._columns = columns

    def has(self, column: str) -> bool:
        return column.lower() in self._columns

    def get(self, column: str) -> str:
        """The stripped value, or ``""`` when the column is absent or the row is short."""
        index = self._columns.get(column.lower())
        if index is None or index >= len(self._values):
            return ""
        return self._values[index].strip()

    def require(self, column: str) -> str:
        value = self.get(column)
        if not value:
            raise ReportError(self.line, column, "is empty")
        return value

    def currency(self, column: str) -> str:
        code = self.require(column).upper()
        try:
            currency_exponent(code)
        except ValueError as exc:
            raise ReportError(self.line, column, str(exc)) from None
        return code

    def minor(self, column: str, currency: str, *, default_zero: bool = False) -> int:
        value = self.get(column)
        if not value:
            if default_zero:
                return 0
            raise ReportError(self.line, column, "is empty")
        try:
            return to_minor_units(value, currency)
        except ValueError as exc:
            raise ReportError(self.line, column, str(exc)) from None


def _records(
    lines: Iterable[str], required: Sequence[str], any_of: Sequence[Sequence[str]]
) -> Iterator[_Row]:
    """The data rows of a CSV report after checking its header (line 1).

    Raises :class:`ReportError` for an empty file, a missing ``required``
    column, or when no column of a group in ``any_of`` is there, and for a
    row that the csv module cannot read.
    """
    reader = csv.reader(lines, strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise ReportError(1, None, f"not a CSV header: {exc}") from None
    if header is None:
        raise ReportError(1, None, "the report is empty (no header line)")
    columns = {name.strip().lstrip("\ufeff").lower(): i for i, name in reversed(list(enumerate(header)))}
    for column in required:
        if column.lower() not in columns:
            raise ReportError(1, column, "the header has no such column")
    for group in any_of:
        if not any(column.lower() in columns for column in group):
            raise ReportError(1, group[0], f"the header needs one of the columns {', '.join(group)}")
    previous = reader.line_num
    while True:
        try:
            values = next(reader, None)
        except csv.Error as exc:
            raise ReportError(previous + 1, None, f"unreadable CSV: {exc}") from None
        if values is None:
            return
        start, previous = previous + 1, reader.line_num
        if not any(v.strip() for v in values):
            continue
        yield _Row(start, values, columns)


@dataclass
class _Collector:
    format: ReportFormat
    rows: int = 0
    lines: list[ReportLine] = field(default_factory=list)
    fee_lines: list[FeeLine] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    first: datetime | None = None
    last: datetime | None = None

    def saw(self, moment: datetime | None) -> None:
        if moment is None:
            return
        self.first = moment if self.first is None else min(self.first, moment)
        self.last = moment if self.last is None else max(self.last, moment)

    def skip(self, category: str) -> None:
        self.skipped[category or "(blank)"] += 1

    def report(self) -> ParsedReport:
        end = None if self.last is None else self.last.replace(microsecond=0) + timedelta(seconds=1)
        return ParsedReport(
            format=self.format,
            rows=self.rows,
            lines=tuple(self.lines),
            fee_lines=tuple(self.fee_lines),
            skipped=tuple(sorted(self.skipped.items())),
            period_start=self.first,
            period_end=end,
        )


def _references(row: _Row, columns: Sequence[str]) -> tuple[str, ...]:
    found: list[str] = []
    for column in columns:
        value = row.get(column)
        if value and value not in found:
            found.append(value)
    if not found:
        raise ReportError(row.line, columns[0], f"no reference: {', '.join(columns)} are all empty")
    return tuple(found)


# --- Stripe ------------------------------------------------------------------------------------------

_STRIPE_KINDS = {
    "charge": JournalKind.CAPTURE,
    "partial_capture_reversal": JournalKind.CAPTURE,
    "refund": JournalKind.REFUND,
    "refund_failure": JournalKind.REFUND,
}
_STRIPE_REFERENCES = {
    JournalKind.CAPTURE: ("payment_intent_id", "charge_id", "source_id"),
    JournalKind.REFUND: ("refund_id", "source_id", "payment_intent_id", "charge_id"),
}


def _utc(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _stripe_time(row: _Row, *, required: bool) -> datetime | None:
    column = "created_utc" if row.get("created_utc") else "created"
    text = row.get(column)
    if not text:
        if required:
            raise ReportError(row.line, "created_utc", "is empty (and so is created)")
        return None
    try:
        return _utc(text)
    except ValueError:
        if required:
            raise ReportError(row.line, column, f"{text!r} is not a date and time") from None
        return None


def parse_stripe_report(lines: Iterable[str]) -> ParsedReport:
    """Read a Stripe balance change from activity itemized report (CSV text lines, header first).

    ``lines`` is any iterable of text lines, e.g. a file opened with
    ``newline=""``. See the module docstring for the columns and categories
    used, with sources. Raises :class:`ReportError` naming the line and
    column of the first malformed relevant row (bad decimal, unknown
    currency, missing reference, ``net`` that is not ``gross - fee``...).
    """
    out = _Collector(ReportFormat.STRIPE)
    rows = _records(
        lines,
        required=("reporting_category", "currency", "gross"),
        any_of=(("created_utc", "created"), ("source_id", "payment_intent_id", "charge_id")),
    )
    for row in rows:
        out.rows += 1
        category = row.get("reporting_category")
        kind = _STRIPE_KINDS.get(category)
        if kind is None and category != "fee":
            out.saw(_stripe_time(row, required=False))
            out.skip(category)
            continue
        moment = _stripe_time(row, required=True)
        assert moment is not None
        out.saw(moment)
        currency = row.currency("currency")
        gross = row.minor("gross", currency)
        fee = row.minor("fee", currency, default_zero=True)
        net = gross - fee
        if row.get("net") and row.minor("net", currency) != net:
            raise ReportError(row.line, "net", f"{row.get('net')} is not gross - fee")
        if kind is None:
            line_id = row.get("balance_transaction_id") or row.get("source_id")
            out.fee_lines.append(FeeLine(row.line, -net, currency, moment, category, line_id))
            continue
        out.lines.append(
            ReportLine(
                line=row.line,
                kind=kind,
                references=_references(row, _STRIPE_REFERENCES[kind]),
                amount_minor=gross if kind is JournalKind.CAPTURE else -gross,
                currency=currency,
                occurred_at=moment,
                category=category,
                fee_minor=fee,
                fee_currency=currency if fee else "",
                line_id=row.get("balance_transaction_id"),
            )
        )
    return out.report()


# --- Adyen -------------------------------------------------------------------------------------------

_ADYEN_KINDS = {
    "Settled": JournalKind.CAPTURE,
    "Refunded": JournalKind.REFUND,
    "RefundedReversed": JournalKind.REFUND,
}
_ADYEN_FEE_TYPES = frozenset({"Fee", "MiscCosts", "PaymentCost"})
_ADYEN_REFERENCES = {
    JournalKind.CAPTURE: ("Psp Reference", "Modification Reference"),
    JournalKind.REFUND: ("Modification Reference", "Psp Reference"),
}
_ADYEN_FEE_COLUMNS = ("Commission (NC)", "Markup (NC)", "Scheme Fees (NC)", "Interchange (NC)")
#: Time zone abbreviations Adyen writes in ``TimeZone`` and their UTC offsets in hours. They
#: follow Java's short zone names (CST is US Central); ambiguous ones such as IST are left out,
#: so such a row is an error naming the abbreviation rather than a guess. IANA names also work.
ADYEN_TIME_ZONES: Mapping[str, float] = {
    "UTC": 0, "GMT": 0, "WET": 0, "WEST": 1, "BST": 1, "CET": 1, "CEST": 2, "EET": 2,
    "EEST": 3, "MSK": 3, "GST": 4, "SGT": 8, "HKT": 8, "AWST": 8, "JST": 9, "KST": 9, "ACST": 9.5,
    "AEST": 10, "AEDT": 11, "NZST": 12, "NZDT": 13, "BRT": -3, "ART": -3, "EST": -5, "EDT": -4,
    "CST": -6, "CDT": -5, "MST": -7, "MDT": -6, "PST": -8, "PDT": -7,
}  # fmt: skip


def _adyen_zone(row: _Row) -> timezone | ZoneInfo:
    name = row.require("TimeZone")
    if name.upper() in ADYEN_TIME_ZONES:
        return timezone(timedelta(hours=ADYEN_TIME_ZONES[name.upper()]))
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ReportError(
            row.line, "TimeZone", f"unknown time zone {name!r} (known: {', '.join(ADYEN_TIME_ZONES)})"
        ) from None


def _adyen_time(row: _Row, *, required: bool) -> datetime | None:
    try:
        text = row.require("Creation Date")
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=_adyen_zone(row))
        return moment.astimezone(UTC)
    except ValueError as exc:
        if not required:
            return None
        if isinstance(exc, ReportError):
            raise
        raise ReportError(
            row.line, "Creation Date", f"{row.get('Creation Date')!r} is not a date and time"
        ) from None


def parse_adyen_report(lines: Iterable[str]) -> ParsedReport:
    """Read an Adyen Settlement details report (CSV text lines, header first).

    See the module docstring for the columns and types used, with sources.
    ``Creation Date`` is read in the row's ``TimeZone`` (an abbreviation of
    :data:`ADYEN_TIME_ZONES` or an IANA name) and converted to UTC. Raises
    :class:`ReportError` naming the line and column of the first malformed
    relevant row.
    """
    out = _Collector(ReportFormat.ADYEN)
    rows = _records(
        lines,
        required=(
            "Psp Reference",
            "Type",
            "Creation Date",
            "TimeZone",
            "Modification Reference",
            "Gross Currency",
            "Gross Debit (GC)",
            "Gross Credit (GC)",
            "Net Currency",
        ),
        any_of=(),
    )
    for row in rows:
        out.rows += 1
        category = row.get("Type")
        kind = _ADYEN_KINDS.get(category)
        if kind is None and category not in _ADYEN_FEE_TYPES:
            out.saw(_adyen_time(row, required=False))
            out.skip(category)
            continue
        moment = _adyen_time(row, required=True)
        assert moment is not None
        out.saw(moment)
        if kind is None:
            currency = row.currency("Net Currency")
            debit = row.minor("Net Debit (NC)", currency, default_zero=True)
            credit = row.minor("Net Credit (NC)", currency, default_zero=True)
            line_id = row.get("Modification Reference") or row.get("Psp Reference")
            out.fee_lines.append(FeeLine(row.line, debit - credit, currency, moment, category, line_id))
            continue
        currency = row.currency("Gross Currency")
        if not row.get("Gross Debit (GC)") and not row.get("Gross Credit (GC)"):
            raise ReportError(
                row.line, "Gross Credit (GC)", f"a {category} row needs a gross debit or credit"
            )
        debit = row.minor("Gross Debit (GC)", currency, default_zero=True)
        credit = row.minor("Gross Credit (GC)", currency, default_zero=True)
        fee, fee_currency = 0, ""
        if any(row.get(column) for column in _ADYEN_FEE_COLUMNS):
            fee_currency = row.currency("Net Currency")
            fee = sum(row.minor(column, fee_currency, default_zero=True) for column in _ADYEN_FEE_COLUMNS)
        out.lines.append(
            ReportLine(
                line=row.line,
                kind=kind,
                references=_references(row, _ADYEN_REFERENCES[kind]),
                amount_minor=credit - debit if kind is JournalKind.CAPTURE else debit - credit,
                currency=currency,
                occurred_at=moment,
                category=category,
                fee_minor=fee,
                fee_currency=fee_currency if fee else "",
                line_id=row.get("Modification Reference"),
            )
        )
    return out.report()


PARSERS: Mapping[ReportFormat, Callable[[Iterable[str]], ParsedReport]] = {
    ReportFormat.STRIPE: parse_stripe_report,
    ReportFormat.ADYEN: parse_adyen_report,
}


def parse_report(report_format: ReportFormat | str, lines: Iterable[str]) -> ParsedReport:
    """Read ``lines`` with the parser of ``report_format``; raises :class:`ReportError` / ``ValueError``."""
    return PARSERS[ReportFormat(report_format)](lines)


# --- matching (pure) ---------------------------------------------------------------------------------


def _conflict_detail(report: Amounts, ledger: Amounts, lines: int, journals: int) -> str:
    same_currencies = {c for c, _ in report} == {c for c, _ in ledger}
    what = "amount differs" if same_currencies else "currency differs"
    counts = f" ({lines} report lines, {journals} journals)" if lines > 1 or journals > 1 else ""
    return f"{what}: report {format_amounts(report)}, ledger {format_amounts(ledger)}{counts}"


def _chosen_reference(line: ReportLine, index: Collection[tuple[JournalKind, str]]) -> str:
    """The "Reference rule": the first candidate naming a journal of the line's kind, else the first."""
    return next((r for r in line.references if (line.kind, r) in index), line.references[0])


def reconcile(
    report: ParsedReport,
    ledger: Iterable[LedgerEntry],
    *,
    period: tuple[datetime, datetime] | None = None,
) -> ReconciliationResult:
    """Match ``report`` against ``ledger`` (pure: no I/O, same input -> same output).

    ``ledger`` holds the processor's journals: at least every journal whose
    reference is one of ``report.references()`` and every journal created
    inside the period (extra ones are harmless: outside the period they are
    only used when a line names them). ``period`` (``[start, end)``, aware
    datetimes) defaults to the report's own. The rules are in the module
    docstring; raises nothing for any well-formed input.
    """
    start, end = period if period is not None else (report.period_start, report.period_end)

    def in_period(entry: LedgerEntry) -> bool:
        return start is not None and end is not None and start <= entry.created_at < end

    index: dict[tuple[JournalKind, str], list[LedgerEntry]] = defaultdict(list)
    fee_entries: list[LedgerEntry] = []
    for entry in sorted(ledger, key=lambda e: (e.sequence, e.currency)):
        if entry.kind is JournalKind.FEE:
            fee_entries.append(entry)
        elif entry.kind in _MATCHED_KINDS:
            index[(entry.kind, entry.reference)].append(entry)

    groups: dict[tuple[JournalKind, str], list[ReportLine]] = defaultdict(list)
    for line in report.lines:
        groups[(line.kind, _chosen_reference(line, index))].append(line)

    items: list[ReconciliationItem] = []
    for (kind, reference), lines in groups.items():
        entries = index.get((kind, reference), [])
        reported = _totals((line.currency, line.amount_minor) for line in lines)
        booked = _totals((entry.currency, entry.amount_minor) for entry in entries)
        journal_ids = tuple(dict.fromkeys(entry.journal_id for entry in entries))
        if not entries:
            outcome, detail = Outcome.MISSING_IN_LEDGER, f"no {kind} journal with this reference"
        elif reported == booked:
            outcome, detail = Outcome.MATCHED, ""
        else:
            outcome = Outcome.CONFLICTED
            detail = _conflict_detail(reported, booked, len(lines), len(journal_ids))
        items.append(
            ReconciliationItem(
                outcome,
                kind,
                reference,
                reported,
                booked,
                tuple(line.line for line in lines),
                journal_ids,
                detail,
            )
        )
    for (kind, reference), entries in index.items():
        if (kind, reference) in groups:
            continue
        inside = [entry for entry in entries if in_period(entry)]
        if inside:
            items.append(
                ReconciliationItem(
                    Outcome.MISSING_IN_REPORT,
                    kind,
                    reference,
                    (),
                    _totals((entry.currency, entry.amount_minor) for entry in inside),
                    (),
                    tuple(dict.fromkeys(entry.journal_id for entry in inside)),
                    f"{kind} journal of {min(e.created_at for e in inside).isoformat()} is not in the report",
                )
            )
    items.sort(key=lambda i: (_OUTCOME_ORDER[i.outcome], i.kind.value, i.reference, i.lines))

    return ReconciliationResult(
        format=report.format,
        rows=report.rows,
        items=tuple(items),
        fees=_fee_totals(
            report, fee_entries, {reference for _, reference in groups} | report.fee_references()
        ),
        skipped=report.skipped,
        period_start=start,
        period_end=end,
    )


def _fee_totals(
    report: ParsedReport,
    fee_entries: Sequence[LedgerEntry],
    references: Collection[str],
) -> tuple[FeeTotal, ...]:
    reported: dict[str, int] = defaultdict(int)
    for line in report.lines:
        if line.fee_currency:
            reported[line.fee_currency] += line.fee_minor
    for fee in report.fee_lines:
        reported[fee.currency] += fee.amount_minor
    booked_entries = [e for e in fee_entries if e.reference in references]
    booked: dict[str, int] = defaultdict(int)
    for entry in booked_entries:
        booked[entry.currency] += entry.amount_minor
    compared = bool(booked_entries)
    return tuple(
        FeeTotal(currency, reported.get(currency, 0), booked.get(currency, 0) if compared else None)
        for currency in sorted(set(reported) | set(booked))
    )


# --- the database ------------------------------------------------------------------------------------


async def load_ledger_entries(
    conn: Connection,
    tenant_id: uuid.UUID,
    processor: str,
    *,
    references: Collection[str],
    period: tuple[datetime, datetime] | None,
) -> list[LedgerEntry]:
    """The tenant's capture/refund/fee journals on ``processor_clearing:<processor>`` to reconcile.

    Those whose reference is in ``references`` (any time) and those created
    in ``period`` (``[start, end)``; none when None), in chain order. Only
    the tenant's own journals are read. Raises
    :class:`~payments.ledger.InvalidPosting` for a bad processor name.
    """
    start, end = period if period is not None else (None, None)
    rows = await conn.fetch(
        """SELECT j.id, j.seq, j.kind, j.reference, j.payment_id, j.created_at, p.currency,
                  sum(p.amount_minor) AS clearing
             FROM ledger_journals j
             JOIN ledger_postings p ON p.tenant_id = j.tenant_id AND p.journal_id = j.id
             JOIN ledger_accounts a ON a.tenant_id = p.tenant_id AND a.id = p.account_id
            WHERE j.tenant_id = $1 AND a.code = $2 AND j.kind = ANY($3::text[])
              AND (j.reference = ANY($4::text[])
                   OR ($5::timestamptz IS NOT NULL AND j.created_at >= $5 AND j.created_at < $6))
            GROUP BY j.id, p.currency
            ORDER BY j.seq, p.currency""",
        tenant_id,
        processor_clearing(processor),
        [kind.value for kind in JournalKind],
        list(references),
        start,
        end,
    )
    return [
        LedgerEntry(
            journal_id=row["id"],
            sequence=row["seq"],
            kind=JournalKind(row["kind"]),
            reference=row["reference"],
            amount_minor=int(row["clearing"]) * (1 if row["kind"] == JournalKind.CAPTURE else -1),
            currency=row["currency"],
            created_at=row["created_at"],
            payment_id=row["payment_id"],
        )
        for row in rows
    ]


@dataclass(frozen=True)
class ReportSource:
    """Where a report came from: its file name and SHA-256 (32 bytes) of its bytes."""

    name: str
    sha256: bytes


def _amounts_json(amounts: Amounts) -> str:
    return json.dumps(dict(amounts), separators=(",", ":"))


async def store_run(
    conn: Connection,
    tenant_id: uuid.UUID,
    processor: str,
    source: ReportSource,
    result: ReconciliationResult,
) -> uuid.UUID:
    """Store ``result`` as one ``reconciliation_runs`` row plus one ``reconciliation_items`` row per item.

    Atomic (its own transaction, or a savepoint inside the caller's). Returns
    the run id (UUIDv7). Raises asyncpg errors, e.g. a foreign key violation
    for an unknown tenant.
    """
    run_id = uuid.UUID(str(uuid6.uuid7()))
    counts = result.counts
    async with conn.transaction():
        await conn.execute(
            """INSERT INTO reconciliation_runs
                   (id, tenant_id, processor, report_format, report_name, report_sha256, report_rows,
                    period_start, period_end, matched, conflicted, missing_in_ledger, missing_in_report,
                    skipped, fees, ok)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
                       $14::jsonb, $15::jsonb, $16)""",
            run_id,
            tenant_id,
            processor,
            result.format.value,
            source.name,
            source.sha256,
            result.rows,
            result.period_start,
            result.period_end,
            counts[Outcome.MATCHED],
            counts[Outcome.CONFLICTED],
            counts[Outcome.MISSING_IN_LEDGER],
            counts[Outcome.MISSING_IN_REPORT],
            json.dumps(dict(result.skipped)),
            json.dumps(
                [
                    {"currency": f.currency, "report_minor": f.report_minor, "ledger_minor": f.ledger_minor}
                    for f in result.fees
                ]
            ),
            result.ok,
        )
        await conn.copy_records_to_table(
            "reconciliation_items",
            columns=[
                "run_id",
                "tenant_id",
                "item_no",
                "outcome",
                "kind",
                "reference",
                "report_amounts",
                "ledger_amounts",
                "report_lines",
                "journal_ids",
                "detail",
            ],
            records=[
                (
                    run_id,
                    tenant_id,
                    n,
                    item.outcome.value,
                    item.kind.value,
                    item.reference,
                    _amounts_json(item.report),
                    _amounts_json(item.ledger),
                    list(item.lines),
                    list(item.journal_ids),
                    item.detail,
                )
                for n, item in enumerate(result.items, start=1)
            ],
        )
    return run_id


async def run_items(
    conn: Connection, tenant_id: uuid.UUID, run_id: uuid.UUID, *, outcome: Outcome | None = None
) -> list[ReconciliationItem]:
    """The stored items of the tenant's run ``run_id`` (optionally of one outcome), in result order.

    Empty for a run of another tenant or an unknown id.
    """
    rows = await conn.fetch(
        """SELECT outcome, kind, reference, report_amounts::text, ledger_amounts::text, report_lines,
                  journal_ids, detail
             FROM reconciliation_items
            WHERE tenant_id = $1 AND run_id = $2 AND ($3::text IS NULL OR outcome = $3)
            ORDER BY item_no""",
        tenant_id,
        run_id,
        None if outcome is None else outcome.value,
    )

    def amounts(text: str) -> Amounts:
        return tuple(sorted((str(c), int(a)) for c, a in json.loads(text).items()))

    return [
        ReconciliationItem(
            outcome=Outcome(row["outcome"]),
            kind=JournalKind(row["kind"]),
            reference=row["reference"],
            report=amounts(row["report_amounts"]),
            ledger=amounts(row["ledger_amounts"]),
            lines=tuple(row["report_lines"]),
            journal_ids=tuple(row["journal_ids"]),
            detail=row["detail"],
        )
        for row in rows
    ]


@dataclass(frozen=True)
class FeeJournals:
    """What posting a report's fees did (:func:`post_report_fees`).

    ``posted``: fee journals written now, ``posted_minor`` their amounts per currency (minor
    units, a returned fee negative); ``already_posted``: fees whose journal exists (an earlier
    import of a report with the same line); ``conflicting``: fees whose reference was posted
    before with another amount (nothing written; the fee comparison reports the difference);
    ``without_reference``: standalone fee lines the report gives no id for (not posted).
    """

    posted: int = 0
    posted_minor: Amounts = ()
    already_posted: int = 0
    conflicting: int = 0
    without_reference: int = 0


def fee_idempotency_key(processor: str, reference: str) -> str:
    """The ledger idempotency key of a fee: ``fee:<processor>:<fee reference>`` (a SHA-256 of the
    reference when the key would exceed the ledger's 200 characters)."""
    key = f"fee:{processor}:{reference}"
    if len(key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        return key
    return f"fee:{processor}:sha256:{hashlib.sha256(reference.encode('utf-8')).hexdigest()}"


async def post_report_fees(
    conn: Connection,
    tenant_id: uuid.UUID,
    processor: str,
    report: ParsedReport,
    ledger: Iterable[LedgerEntry],
) -> FeeJournals:
    """Post the fees ``report`` shows as ledger journals, once per fee reference; inside the
    caller's transaction.

    Every fee of the report (the fee withheld on a capture or refund line -- Stripe's balance
    transaction ``fee``, Adyen's commission + markup + scheme fees + interchange -- and every
    standalone fee line) becomes one journal of kind ``fee``
    (:func:`payments.ledger.fee_postings`: Dr ``fees`` / Cr ``processor_clearing:<processor>``,
    reversed for a fee given back) in the fee's currency, with reference :func:`fee_reference`,
    idempotency key :func:`fee_idempotency_key` and the payment of the line's capture or refund
    journal in ``ledger`` (none for standalone fees or lines missing in the ledger: the
    processor took the fee all the same). A second import of the same report posts nothing
    more. Fees are posted whatever the matching found: the money the processor withheld is
    the report's to say, and the run's discrepancies are reported separately.

    Raises :class:`~payments.ledger.InvalidPosting` for a bad processor name and asyncpg errors.
    """
    index: dict[tuple[JournalKind, str], list[LedgerEntry]] = defaultdict(list)
    for entry in ledger:
        if entry.kind in _MATCHED_KINDS:
            index[(entry.kind, entry.reference)].append(entry)
    wanted: list[tuple[str, int, str, uuid.UUID | None]] = []
    without_reference = 0
    for line in report.lines:
        reference = fee_reference(line)
        if reference is not None:
            booked = index.get((line.kind, _chosen_reference(line, index)), [])
            payment_id = next((e.payment_id for e in booked if e.payment_id is not None), None)
            wanted.append((reference, line.fee_minor, line.fee_currency, payment_id))
    for fee in report.fee_lines:
        reference = fee_reference(fee)
        if reference is None:
            without_reference += fee.amount_minor != 0
        else:
            wanted.append((reference, fee.amount_minor, fee.currency, None))
    # A reference listed twice (a duplicated line) is one fee: the copy is "already posted" if it
    # says the same, a conflict if not.
    unique: dict[str, tuple[str, int, str, uuid.UUID | None]] = {}
    already = conflicting = 0
    for item in wanted:
        first = unique.setdefault(item[0], item)
        if first is not item:
            same = first[1:3] == item[1:3]
            already, conflicting = already + same, conflicting + (not same)
    requests: list[JournalRequest] = []
    for reference, amount_minor, currency, payment_id in unique.values():
        postings = fee_postings(processor, abs(amount_minor), currency)
        if amount_minor < 0:  # a fee given back: the reverse postings
            postings = [replace(p, amount_minor=-p.amount_minor) for p in reversed(postings)]
        key = fee_idempotency_key(processor, reference)
        requests.append(
            JournalRequest(JournalKind.FEE, payment_id, reference[:MAX_REFERENCE_CHARS], key, postings)
        )
    async with conn.transaction():
        journals = await post_journals(conn, tenant_id, requests)
    posted: list[tuple[str, int]] = []
    for (_, amount_minor, currency, _), journal in zip(unique.values(), journals, strict=True):
        if isinstance(journal, IdempotencyConflict):
            conflicting += 1
        elif journal.replayed:
            already += 1
        else:
            posted.append((currency, amount_minor))
    return FeeJournals(len(posted), _totals(posted), already, conflicting, without_reference)


@dataclass(frozen=True)
class StoredRun:
    """A reconciliation that was run and stored: its id, its result and the fee journals it posted."""

    run_id: uuid.UUID
    result: ReconciliationResult
    fee_journals: FeeJournals = FeeJournals()


async def reconcile_and_store(
    conn: Connection,
    tenant_id: uuid.UUID,
    processor: str,
    report: ParsedReport,
    source: ReportSource,
    *,
    period: tuple[datetime, datetime] | None = None,
) -> StoredRun:
    """Load the ledger entries ``report`` needs, :func:`reconcile`, then in ONE transaction
    :func:`post_report_fees` (the report's fees become fee journals, once per fee reference) and
    :func:`store_run` the result.

    The fees are compared with the ledger before they are posted: the first import of a report
    compares nothing (no fee journal yet), a later one compares the journals posted then. So a
    stored run and its fee journals commit together or not at all. ``period`` overrides the
    report's own (``[start, end)``). Raises :class:`~payments.ledger.InvalidPosting` for a bad
    processor name and asyncpg errors.
    """
    window = period if period is not None else _report_period(report)
    ledger = await load_ledger_entries(
        conn, tenant_id, processor, references=report.references(), period=window
    )
    result = reconcile(report, ledger, period=window)
    async with conn.transaction():
        fee_journals = await post_report_fees(conn, tenant_id, processor, report, ledger)
        run_id = await store_run(conn, tenant_id, processor, source, result)
    return StoredRun(run_id, result, fee_journals)


def _report_period(report: ParsedReport) -> tuple[datetime, datetime] | None:
    if report.period_start is None or report.period_end is None:
        return None
    return report.period_start, report.period_end
