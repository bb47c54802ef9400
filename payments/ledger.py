"""The payments ledger: double-entry, append-only, hash-chained per tenant.

Money is recorded as **journals** (one per money movement) made of
**postings** (one per account touched). Tables: ``ledger_accounts``,
``ledger_journals``, ``ledger_postings`` (migration ``0007_ledger.sql``).

Sign convention
---------------
Every amount is a signed integer in **minor units** of an ISO 4217 currency
(1050 with ``"EUR"`` is 10.50 EUR). A **debit is positive, a credit is
negative**. The postings of a journal sum to 0 in every currency (double
entry); a journal may mix currencies only if each currency balances on its
own. An account's balance is the sum of its postings: positive means a debit
balance, negative a credit balance.

Chart of accounts (per tenant; the tenant is the merchant)
----------------------------------------------------------
=============================  ================  ======  ==================================================
code                           kind              normal  holds
=============================  ================  ======  ==================================================
``customer_receivable``        asset             debit   what customers owe for captured sales not yet
                                                         collected (0 after every capture journal, which
                                                         posts the sale and its collection together)
``processor_clearing:<name>``  asset             debit   money processor ``<name>`` (``stripe``, ``adyen``)
                                                         holds for the merchant until it pays out
``merchant_balance``           liability         credit  gross captured sales owed to the merchant
``refunds``                    contra_liability  debit   refunds paid back to customers (reduces what the
                                                         merchant is owed)
``fees``                       expense           debit   processor fees
=============================  ================  ======  ==================================================

So at any time, per currency, ``sum(processor_clearing:*) + customer_receivable
= -(merchant_balance + refunds + fees)``: the money at the processors is the
merchant's net (gross sales - refunds - fees).

Which journal each money movement posts
---------------------------------------
- **Authorization** (``REQUIRES_CAPTURE``): *no journal*. An authorization is
  a hold at the card issuer; no money has moved.
- **Cancellation** of an uncaptured authorization: *no journal* (nothing was
  posted for the authorization). A captured payment is never "cancelled": it
  is refunded.
- **Capture / charge succeeded** (``SUCCEEDED``, amount ``A`` = the amount
  captured, which may be less than authorized), :func:`capture_postings`,
  kind ``capture``::

      Dr customer_receivable        +A   (the sale: the customer owes A)
      Cr merchant_balance           -A
      Dr processor_clearing:<p>     +A   (the processor collected A from the card)
      Cr customer_receivable        -A

- **Refund succeeded** (amount ``R``, partial refunds are separate journals),
  :func:`refund_postings`, kind ``refund``::

      Dr refunds                    +R
      Cr processor_clearing:<p>     -R

- **Processor fee** (amount ``F``, from the processor's settlement report:
  Stripe's balance transaction ``fee``, Adyen's commission, markup, scheme
  fees and interchange), :func:`fee_postings`, kind ``fee``; posted by
  ``switchboard reconcile`` (payments/reconciliation.py ``post_report_fees``),
  a fee given back with the reverse postings::

      Dr fees                       +F
      Cr processor_clearing:<p>     -F

Idempotency keys (unique per tenant): ``capture:<payment id>`` /
``capture:<capture id>``, ``refund:<refund id>``, ``fee:<processor>:<fee
reference>`` (the report's balance transaction or modification id). A
redelivered Kafka message or a report imported again therefore finds its
journal already posted and posts nothing. :func:`post_journals` appends many
journals at once (reconciliation's fees).

Hash chain and canonical encoding
---------------------------------
Each tenant's journals are numbered ``seq`` = 1, 2, 3, ... without gaps and
chained: ``hash(n) = SHA-256(prev_hash || header || postings_digest)`` where
``prev_hash`` is ``hash(n-1)`` (32 zero bytes for ``seq`` 1). A journal is
written under ``pg_advisory_xact_lock(LEDGER_LOCK_CLASS, tenant_lock_key(t))``
so a tenant's journals are appended one at a time.

Encoding primitives (all integers big-endian, two's complement when signed):

- ``u32(n)``: 4 bytes; ``i64(n)``: 8 bytes;
- ``str(s)``: ``u32(len(utf8(s))) || utf8(s)``;
- ``uuid(u)``: the UUID's 16 bytes in RFC 9562 (network) order;
- ``time(t)``: ``i64`` microseconds from 1970-01-01T00:00:00Z to ``t``
  (PostgreSQL ``timestamptz`` precision, exact).

``header`` =::

    str("switchboard.ledger/1")
    || uuid(tenant_id) || i64(seq) || uuid(journal id) || str(kind)
    || (0x00 if payment_id is NULL else 0x01 || uuid(payment_id))
    || str(reference) || str(idempotency_key) || time(created_at)
    || u32(posting_count)

``postings_digest`` = ``SHA-256(u32(n) || line_1 || ... || line_n)`` over the
journal's postings in ascending ``line_no`` (1..n, the order the caller gave),
where ``line_i`` = ``u32(line_no) || str(account code) || ascii(currency, 3
bytes) || i64(amount_minor)``.

The stored ``postings_digest`` column lets a verifier tell an altered posting
from an altered journal row; both are covered by ``hash``.
"""

from __future__ import annotations

import enum
import hashlib
import re
import struct
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import asyncpg
import uuid6

from switchboard.db.pool import Connection

#: The ``prev_hash`` of a tenant's first journal.
GENESIS_HASH = bytes(32)
#: The version tag at the start of every journal header.
ENCODING_TAG = "switchboard.ledger/1"
#: First key of ``pg_advisory_xact_lock(int, int)``: ASCII ``"ldgr"``.
LEDGER_LOCK_CLASS = int.from_bytes(b"ldgr", "big", signed=True)
#: At most this many postings in one journal (also a database CHECK).
MAX_POSTINGS = 1000
#: Longest ``reference`` / ``idempotency_key`` (characters; also database CHECKs).
MAX_REFERENCE_CHARS = 200
MAX_IDEMPOTENCY_KEY_CHARS = 200

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

CUSTOMER_RECEIVABLE = "customer_receivable"
MERCHANT_BALANCE = "merchant_balance"
REFUNDS = "refunds"
FEES = "fees"
PROCESSOR_CLEARING_PREFIX = "processor_clearing:"

_PROCESSOR_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_CURRENCY_RE = re.compile(r"[A-Z]{3}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class LedgerError(Exception):
    """Base class of every ledger error."""


class InvalidPosting(LedgerError, ValueError):
    """A posting or journal argument breaks a rule (account, currency, amount, length)."""


class UnbalancedJournal(InvalidPosting):
    """The postings do not sum to 0 in every currency.

    ``totals`` maps each unbalanced currency to its sum in minor units.
    """

    def __init__(self, totals: Mapping[str, int]) -> None:
        self.totals = dict(totals)
        shown = ", ".join(f"{currency} {total:+d}" for currency, total in sorted(self.totals.items()))
        super().__init__(
            f"journal is unbalanced: postings must sum to 0 minor units per currency, got {shown}"
        )


class IdempotencyConflict(LedgerError):
    """The idempotency key was already used for a different journal (kind, payment, reference or postings)."""


class NotInTransaction(LedgerError):
    """:func:`post_journal` was called outside a transaction."""


class AccountKind(enum.StrEnum):
    """The kind of a ledger account (which side is its normal balance)."""

    ASSET = "asset"
    LIABILITY = "liability"
    CONTRA_LIABILITY = "contra_liability"
    EXPENSE = "expense"

    @property
    def normal_side(self) -> str:
        """``"debit"`` or ``"credit"``: the side on which this kind normally has its balance."""
        return "credit" if self is AccountKind.LIABILITY else "debit"


class JournalKind(enum.StrEnum):
    """What a journal records (see the module docstring for each one's postings)."""

    CAPTURE = "capture"
    REFUND = "refund"
    FEE = "fee"


def processor_clearing(processor: str) -> str:
    """The clearing account code of ``processor``: ``"processor_clearing:<processor>"``.

    ``processor`` is the connector's name (``PaymentProcessor.name``):
    1-32 characters of ``a-z 0-9 _ -``, starting with a letter or digit.
    Raises :class:`InvalidPosting` otherwise.
    """
    if not _PROCESSOR_RE.fullmatch(processor):
        raise InvalidPosting(f"processor name must match [a-z0-9][a-z0-9_-]{{0,31}}, got {processor!r}")
    return PROCESSOR_CLEARING_PREFIX + processor


def account_kind(code: str) -> AccountKind:
    """The kind of account ``code`` in the chart of accounts.

    Raises :class:`InvalidPosting` for a code that is not in the chart.
    """
    fixed = {
        CUSTOMER_RECEIVABLE: AccountKind.ASSET,
        MERCHANT_BALANCE: AccountKind.LIABILITY,
        REFUNDS: AccountKind.CONTRA_LIABILITY,
        FEES: AccountKind.EXPENSE,
    }
    if code in fixed:
        return fixed[code]
    if code.startswith(PROCESSOR_CLEARING_PREFIX) and _PROCESSOR_RE.fullmatch(
        code.removeprefix(PROCESSOR_CLEARING_PREFIX)
    ):
        return AccountKind.ASSET
    raise InvalidPosting(f"unknown ledger account {code!r} (see the chart of accounts in payments/ledger.py)")


def check_currency(currency: str) -> str:
    """Return ``currency`` if it is an ISO 4217 alphabetic code (three upper-case letters).

    Raises :class:`InvalidPosting` otherwise (``"eur"`` and ``"EURO"`` are refused).
    """
    if not isinstance(currency, str) or not _CURRENCY_RE.fullmatch(currency):
        raise InvalidPosting(
            f"currency must be an ISO 4217 code of three upper-case letters, got {currency!r}"
        )
    return currency


def _check_amount(amount_minor: int, *, positive: bool = False) -> int:
    if isinstance(amount_minor, bool) or not isinstance(amount_minor, int):
        raise InvalidPosting(f"amount must be an integer number of minor units, got {amount_minor!r}")
    if not INT64_MIN <= amount_minor <= INT64_MAX:
        raise InvalidPosting(f"amount {amount_minor} minor units does not fit in 64 bits")
    if amount_minor == 0 or (positive and amount_minor < 0):
        raise InvalidPosting(f"amount must be {'> 0' if positive else 'non-zero'}, got {amount_minor}")
    return amount_minor


@dataclass(frozen=True)
class Posting:
    """One line of a journal: ``amount_minor`` (signed minor units) of ``currency`` on ``account``.

    Positive is a debit, negative a credit; never 0; must fit in int64.
    ``account`` is a code of the chart of accounts, ``currency`` an ISO 4217
    code. Raises :class:`InvalidPosting` when constructed with anything else.
    """

    account: str
    amount_minor: int
    currency: str

    def __post_init__(self) -> None:
        account_kind(self.account)
        check_currency(self.currency)
        _check_amount(self.amount_minor)

    @classmethod
    def debit(cls, account: str, amount_minor: int, currency: str) -> Posting:
        """A debit of ``amount_minor`` (> 0) minor units."""
        return cls(account, _check_amount(amount_minor, positive=True), currency)

    @classmethod
    def credit(cls, account: str, amount_minor: int, currency: str) -> Posting:
        """A credit of ``amount_minor`` (> 0) minor units (stored as ``-amount_minor``)."""
        return cls(account, -_check_amount(amount_minor, positive=True), currency)


@dataclass(frozen=True)
class Journal:
    """A posted journal as stored.

    ``sequence`` is its place in the tenant's chain (1, 2, ...); ``hash`` and
    ``prev_hash`` are 32-byte SHA-256 values (see the module docstring);
    ``postings`` are in ``line_no`` order. ``replayed`` is True when
    :func:`post_journal` found the journal already posted under the same
    idempotency key and posted nothing.
    """

    id: uuid.UUID
    tenant_id: uuid.UUID
    sequence: int
    kind: JournalKind
    payment_id: uuid.UUID | None
    reference: str
    idempotency_key: str
    created_at: datetime
    postings: tuple[Posting, ...]
    postings_digest: bytes
    prev_hash: bytes
    hash: bytes
    replayed: bool = False


# --- building the postings of each money movement -------------------------------------------------


def capture_postings(processor: str, amount_minor: int, currency: str) -> list[Posting]:
    """Postings of a succeeded capture (or an automatic-capture charge) of ``amount_minor`` > 0.

    Dr customer_receivable / Cr merchant_balance (the sale), then
    Dr processor_clearing:<processor> / Cr customer_receivable (the collection).
    Post them with kind :attr:`JournalKind.CAPTURE`. Raises :class:`InvalidPosting`.
    """
    clearing = processor_clearing(processor)
    return [
        Posting.debit(CUSTOMER_RECEIVABLE, amount_minor, currency),
        Posting.credit(MERCHANT_BALANCE, amount_minor, currency),
        Posting.debit(clearing, amount_minor, currency),
        Posting.credit(CUSTOMER_RECEIVABLE, amount_minor, currency),
    ]


def refund_postings(processor: str, amount_minor: int, currency: str) -> list[Posting]:
    """Postings of a succeeded refund of ``amount_minor`` > 0: Dr refunds / Cr processor_clearing.

    Post them with kind :attr:`JournalKind.REFUND`, one journal per refund.
    Raises :class:`InvalidPosting`.
    """
    return [
        Posting.debit(REFUNDS, amount_minor, currency),
        Posting.credit(processor_clearing(processor), amount_minor, currency),
    ]


def fee_postings(processor: str, fee_minor: int, currency: str) -> list[Posting]:
    """Postings of a processor fee of ``fee_minor`` > 0: Dr fees / Cr processor_clearing.

    Post them with kind :attr:`JournalKind.FEE`. Raises :class:`InvalidPosting`.
    """
    return [
        Posting.debit(FEES, fee_minor, currency),
        Posting.credit(processor_clearing(processor), fee_minor, currency),
    ]


def unbalanced_totals(lines: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Per currency, the non-zero sums of ``(currency, amount_minor)`` pairs (empty when balanced)."""
    totals: dict[str, int] = defaultdict(int)
    for currency, amount in lines:
        totals[currency] += amount
    return {currency: total for currency, total in totals.items() if total != 0}


def validate_postings(postings: Sequence[Posting]) -> tuple[Posting, ...]:
    """Check a journal's postings before anything touches the database; return them as a tuple.

    Rules: 2..1000 :class:`Posting` objects, summing to 0 per currency.
    Raises :class:`InvalidPosting` or :class:`UnbalancedJournal` (both ``ValueError``).
    """
    lines = tuple(postings)
    if not all(isinstance(p, Posting) for p in lines):
        raise InvalidPosting("postings must be Posting objects")
    if not 2 <= len(lines) <= MAX_POSTINGS:
        raise InvalidPosting(f"a journal has 2 to {MAX_POSTINGS} postings, got {len(lines)}")
    totals = unbalanced_totals((p.currency, p.amount_minor) for p in lines)
    if totals:
        raise UnbalancedJournal(totals)
    return lines


# --- canonical encoding ----------------------------------------------------------------------------


def _str(value: str) -> bytes:
    data = value.encode("utf-8")
    return struct.pack(">I", len(data)) + data


def micros_since_epoch(moment: datetime) -> int:
    """``moment`` (timezone-aware) as whole microseconds since 1970-01-01T00:00:00Z.

    Raises ``ValueError`` for a naive datetime.
    """
    if moment.tzinfo is None:
        raise ValueError("created_at must be timezone-aware")
    return (moment - _EPOCH) // _MICROSECOND


def encode_header(
    *,
    tenant_id: uuid.UUID,
    sequence: int,
    journal_id: uuid.UUID,
    kind: str,
    payment_id: uuid.UUID | None,
    reference: str,
    idempotency_key: str,
    created_at: datetime,
    posting_count: int,
) -> bytes:
    """The canonical ``header`` bytes of a journal (layout in the module docstring)."""
    return b"".join(
        (
            _str(ENCODING_TAG),
            tenant_id.bytes,
            struct.pack(">q", sequence),
            journal_id.bytes,
            _str(kind),
            b"\x00" if payment_id is None else b"\x01" + payment_id.bytes,
            _str(reference),
            _str(idempotency_key),
            struct.pack(">q", micros_since_epoch(created_at)),
            struct.pack(">I", posting_count),
        )
    )


def postings_digest(lines: Sequence[tuple[int, str, str, int]]) -> bytes:
    """SHA-256 over ``u32(n)`` and each ``(line_no, account code, currency, amount_minor)`` line.

    ``lines`` must already be in ascending ``line_no`` order (layout in the module docstring).
    """
    digest = hashlib.sha256(struct.pack(">I", len(lines)))
    for line_no, account, currency, amount in lines:
        digest.update(struct.pack(">I", line_no) + _str(account) + currency.encode("ascii"))
        digest.update(struct.pack(">q", amount))
    return digest.digest()


def chain_hash(prev_hash: bytes, header: bytes, digest: bytes) -> bytes:
    """``SHA-256(prev_hash || header || postings_digest)``: a journal's link in the chain."""
    return hashlib.sha256(prev_hash + header + digest).digest()


def tenant_lock_key(tenant_id: uuid.UUID) -> int:
    """Second key of the tenant's ``pg_advisory_xact_lock``: the first 4 bytes of SHA-256(uuid bytes).

    Two tenants sharing a key only wait for each other; they never share a chain.
    """
    return int.from_bytes(hashlib.sha256(tenant_id.bytes).digest()[:4], "big", signed=True)


# --- reading and writing ---------------------------------------------------------------------------

_JOURNAL_SELECT = """
    SELECT j.id, j.tenant_id, j.seq, j.kind, j.payment_id, j.reference, j.idempotency_key,
           j.created_at, j.postings_digest, j.prev_hash, j.hash,
           array_agg(a.code ORDER BY p.line_no) AS accounts,
           array_agg(p.amount_minor ORDER BY p.line_no) AS amounts,
           array_agg(p.currency ORDER BY p.line_no) AS currencies
      FROM ledger_journals j
      JOIN ledger_postings p ON p.journal_id = j.id
      JOIN ledger_accounts a ON a.id = p.account_id
"""
_JOURNAL_GROUP = " GROUP BY j.id"


def _journal(row: asyncpg.Record, *, replayed: bool = False) -> Journal:
    postings = tuple(
        Posting(account, amount, currency)
        for account, amount, currency in zip(row["accounts"], row["amounts"], row["currencies"], strict=True)
    )
    return Journal(
        id=row["id"],
        tenant_id=row["tenant_id"],
        sequence=row["seq"],
        kind=JournalKind(row["kind"]),
        payment_id=row["payment_id"],
        reference=row["reference"],
        idempotency_key=row["idempotency_key"],
        created_at=row["created_at"],
        postings=postings,
        postings_digest=bytes(row["postings_digest"]),
        prev_hash=bytes(row["prev_hash"]),
        hash=bytes(row["hash"]),
        replayed=replayed,
    )


async def find_journal(
    conn: Connection | asyncpg.Pool, tenant_id: uuid.UUID, idempotency_key: str
) -> Journal | None:
    """The tenant's journal posted under ``idempotency_key``, or None."""
    row = await conn.fetchrow(
        _JOURNAL_SELECT + " WHERE j.tenant_id = $1 AND j.idempotency_key = $2" + _JOURNAL_GROUP,
        tenant_id,
        idempotency_key,
    )
    return None if row is None else _journal(row)


async def payment_journals(
    conn: Connection | asyncpg.Pool, tenant_id: uuid.UUID, payment_id: uuid.UUID
) -> list[Journal]:
    """Every journal of payment ``payment_id`` of the tenant, in chain order."""
    rows = await conn.fetch(
        _JOURNAL_SELECT
        + " WHERE j.tenant_id = $1 AND j.payment_id = $2"
        + _JOURNAL_GROUP
        + " ORDER BY j.seq",
        tenant_id,
        payment_id,
    )
    return [_journal(row) for row in rows]


def _check_text(name: str, value: str, low: int, high: int) -> None:
    if not isinstance(value, str) or not low <= len(value) <= high:
        raise InvalidPosting(f"{name} must be a string of {low} to {high} characters, got {value!r}")


@dataclass(frozen=True)
class JournalRequest:
    """One journal to post with :func:`post_journals`; the arguments of :func:`post_journal`."""

    kind: JournalKind | str
    payment_id: uuid.UUID | None
    reference: str
    idempotency_key: str
    postings: Sequence[Posting]


async def post_journal(
    conn: Connection,
    tenant_id: uuid.UUID,
    *,
    kind: JournalKind | str,
    payment_id: uuid.UUID | None,
    reference: str,
    idempotency_key: str,
    postings: Sequence[Posting],
) -> Journal:
    """Append one journal to the tenant's chain, inside the caller's open transaction.

    The journal commits or rolls back with the caller's transaction, so a
    payment's state change and its journal are one atomic change. The caller
    transaction must be READ COMMITTED (PostgreSQL's default): each statement
    after the tenant's advisory lock then sees the latest committed head of
    the chain. (Under REPEATABLE READ a concurrent append surfaces as
    ``asyncpg.UniqueViolationError`` on ``ledger_journals_seq_key``, never as
    a forked chain.)

    Arguments: ``kind`` a :class:`JournalKind`; ``payment_id`` the payment the
    movement belongs to (or None); ``reference`` free text up to 200
    characters (e.g. the processor's ``pi_...`` / ``re_...`` id);
    ``idempotency_key`` 1-200 characters, unique per tenant; ``postings`` in the
    order they are to be stored (line 1, 2, ...), e.g. from
    :func:`capture_postings`.

    Idempotent by (tenant, ``idempotency_key``): if that key was already
    posted, returns the stored journal with ``replayed=True`` and writes
    nothing, provided kind, payment, reference and postings are the same.

    Raises, before any SQL: :class:`InvalidPosting` / :class:`UnbalancedJournal`
    (``ValueError`` subclasses) for bad arguments, :class:`NotInTransaction`
    outside a transaction. Then :class:`IdempotencyConflict` when the key was
    used for a different journal; ``asyncpg.ForeignKeyViolationError`` for an
    unknown tenant.
    """
    request = JournalRequest(kind, payment_id, reference, idempotency_key, postings)
    (journal,) = await post_journals(conn, tenant_id, [request])
    if isinstance(journal, IdempotencyConflict):
        raise journal
    return journal


async def post_journals(
    conn: Connection, tenant_id: uuid.UUID, requests: Sequence[JournalRequest]
) -> list[Journal | IdempotencyConflict]:
    """Append several journals to the tenant's chain in a few statements, in ``requests`` order;
    inside the caller's open transaction (READ COMMITTED, see :func:`post_journal`).

    Each request is :func:`post_journal`'s: a key already posted with the same content is
    returned ``replayed``; a key already posted with other content is answered with an
    :class:`IdempotencyConflict` in its place (nothing written for it; the others are posted),
    so a caller with many journals (reconciliation's fees) is not stopped by one. One advisory
    lock, one read of the existing keys, one read of the head, one account upsert and one
    insert whatever the count: 10,000 journals take about what 10 single posts take.

    Raises, before any SQL: :class:`InvalidPosting` / :class:`UnbalancedJournal` for a bad
    request or a key given twice, :class:`NotInTransaction` outside a transaction; then
    asyncpg errors (``ForeignKeyViolationError`` for an unknown tenant).
    """
    checked: list[tuple[JournalKind, JournalRequest, tuple[Posting, ...]]] = []
    for request in requests:
        try:
            journal_kind = JournalKind(request.kind)
        except ValueError:
            raise InvalidPosting(f"unknown journal kind {request.kind!r}") from None
        lines = validate_postings(request.postings)
        _check_text("reference", request.reference, 0, MAX_REFERENCE_CHARS)
        _check_text("idempotency_key", request.idempotency_key, 1, MAX_IDEMPOTENCY_KEY_CHARS)
        checked.append((journal_kind, request, lines))
    keys = [request.idempotency_key for _, request, _ in checked]
    if len(set(keys)) != len(keys):
        raise InvalidPosting("an idempotency key appears twice among the journals to post")
    if not conn.is_in_transaction():
        raise NotInTransaction(
            "post_journal must run inside the caller's transaction (async with conn.transaction())"
        )
    if not checked:
        return []

    # Its own statement: the statements after it take their snapshot once the lock is held.
    await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", LEDGER_LOCK_CLASS, tenant_lock_key(tenant_id))

    existing = {
        row["idempotency_key"]: _journal(row)
        for row in await conn.fetch(
            _JOURNAL_SELECT
            + " WHERE j.tenant_id = $1 AND j.idempotency_key = ANY($2::text[])"
            + _JOURNAL_GROUP,
            tenant_id,
            keys,
        )
    }
    results: list[Journal | IdempotencyConflict | None] = []
    fresh: list[tuple[int, JournalKind, JournalRequest, tuple[Posting, ...]]] = []
    for n, (journal_kind, request, lines) in enumerate(checked):
        stored = existing.get(request.idempotency_key)
        if stored is None:
            results.append(None)
            fresh.append((n, journal_kind, request, lines))
            continue
        asked = (journal_kind, request.payment_id, request.reference, lines)
        if asked != (stored.kind, stored.payment_id, stored.reference, stored.postings):
            results.append(
                IdempotencyConflict(
                    f"idempotency key {request.idempotency_key!r} was already posted as journal {stored.id} "
                    f"(sequence {stored.sequence}) with a different kind, payment, reference or postings"
                )
            )
        else:
            results.append(replace(stored, replayed=True))
    if not fresh:
        return _all_answered(results)

    head = await conn.fetchrow(
        """SELECT clock_timestamp() AS now, h.seq, h.hash
             FROM (SELECT 1) AS one
             LEFT JOIN LATERAL (SELECT seq, hash FROM ledger_journals
                                 WHERE tenant_id = $1 ORDER BY seq DESC LIMIT 1) h ON true""",
        tenant_id,
    )
    assert head is not None
    sequence = 0 if head["seq"] is None else head["seq"]
    prev_hash = GENESIS_HASH if head["hash"] is None else bytes(head["hash"])
    created_at: datetime = head["now"]

    codes = sorted({p.account for _, _, _, lines in fresh for p in lines})
    account_rows = await conn.fetch(
        """WITH wanted (code, kind) AS (SELECT * FROM unnest($2::text[], $3::text[])),
                added AS (INSERT INTO ledger_accounts (tenant_id, code, kind)
                          SELECT $1, code, kind FROM wanted
                          ON CONFLICT (tenant_id, code) DO NOTHING
                          RETURNING code, id)
           SELECT code, id FROM added
           UNION ALL
           SELECT a.code, a.id FROM ledger_accounts a JOIN wanted w USING (code) WHERE a.tenant_id = $1""",
        tenant_id,
        codes,
        [account_kind(code).value for code in codes],
    )
    account_ids = {row["code"]: row["id"] for row in account_rows}

    journal_rows: list[tuple[object, ...]] = []
    posting_rows: list[tuple[uuid.UUID, int, int, int, str]] = []
    for n, journal_kind, request, lines in fresh:
        sequence += 1
        journal_id = uuid.UUID(str(uuid6.uuid7()))
        numbered = [(i, p.account, p.currency, p.amount_minor) for i, p in enumerate(lines, start=1)]
        digest = postings_digest(numbered)
        header = encode_header(
            tenant_id=tenant_id,
            sequence=sequence,
            journal_id=journal_id,
            kind=journal_kind.value,
            payment_id=request.payment_id,
            reference=request.reference,
            idempotency_key=request.idempotency_key,
            created_at=created_at,
            posting_count=len(lines),
        )
        link = chain_hash(prev_hash, header, digest)
        journal_rows.append(
            (journal_id, sequence, journal_kind.value, request.payment_id, request.reference,
             request.idempotency_key, len(lines), digest, prev_hash, link)
        )  # fmt: skip
        posting_rows.extend(
            (journal_id, i, account_ids[account], amount, currency)
            for i, account, currency, amount in numbered
        )
        results[n] = Journal(
            id=journal_id,
            tenant_id=tenant_id,
            sequence=sequence,
            kind=journal_kind,
            payment_id=request.payment_id,
            reference=request.reference,
            idempotency_key=request.idempotency_key,
            created_at=created_at,
            postings=lines,
            postings_digest=digest,
            prev_hash=prev_hash,
            hash=link,
        )
        prev_hash = link

    # One statement, so even with SET CONSTRAINTS ALL IMMEDIATE the balance
    # triggers run after the journals and all their postings exist.
    columns = list(zip(*journal_rows, strict=True))
    posting_columns = list(zip(*posting_rows, strict=True))
    await conn.execute(
        """WITH journal AS (
               INSERT INTO ledger_journals (id, tenant_id, seq, kind, payment_id, reference, idempotency_key,
                                            created_at, posting_count, postings_digest, prev_hash, hash)
               SELECT j.id, $1, j.seq, j.kind, j.payment_id, j.reference, j.idempotency_key, $2,
                      j.posting_count, j.postings_digest, j.prev_hash, j.hash
                 FROM unnest($3::uuid[], $4::bigint[], $5::text[], $6::uuid[], $7::text[], $8::text[],
                             $9::int[], $10::bytea[], $11::bytea[], $12::bytea[])
                      AS j (id, seq, kind, payment_id, reference, idempotency_key, posting_count,
                            postings_digest, prev_hash, hash)
               RETURNING id)
           INSERT INTO ledger_postings (journal_id, tenant_id, line_no, account_id, amount_minor, currency)
           SELECT l.journal_id, $1, l.line_no, l.account_id, l.amount_minor, l.currency
             FROM unnest($13::uuid[], $14::int[], $15::bigint[], $16::bigint[], $17::text[])
                  AS l (journal_id, line_no, account_id, amount_minor, currency)""",
        tenant_id,
        created_at,
        *[list(column) for column in columns],
        *[list(column) for column in posting_columns],
    )
    return _all_answered(results)


def _all_answered(results: list[Journal | IdempotencyConflict | None]) -> list[Journal | IdempotencyConflict]:
    answered = [r for r in results if r is not None]
    assert len(answered) == len(results), "every request has its journal or its conflict"
    return answered


# --- balances --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccountBalance:
    """One account's totals in one currency, in minor units.

    ``debits_minor`` and ``credits_minor`` are both >= 0 (sums of the
    positive and of the negated negative postings); ``balance_minor`` =
    debits - credits (positive: debit balance, negative: credit balance).
    """

    tenant_id: uuid.UUID
    tenant_name: str
    account: str
    kind: AccountKind
    currency: str
    debits_minor: int
    credits_minor: int
    postings: int

    @property
    def balance_minor(self) -> int:
        """Signed balance: debits - credits."""
        return self.debits_minor - self.credits_minor


async def account_balances(
    conn: Connection | asyncpg.Pool, tenant_id: uuid.UUID | None = None
) -> list[AccountBalance]:
    """Balances per tenant, account and currency (all tenants when ``tenant_id`` is None).

    Ordered by tenant name, account code, currency. Accounts without postings are left out.
    """
    rows = await conn.fetch(
        """SELECT t.id AS tenant_id, t.name AS tenant_name, a.code, a.kind, p.currency,
                  coalesce(sum(p.amount_minor) FILTER (WHERE p.amount_minor > 0), 0) AS debits,
                  coalesce(-sum(p.amount_minor) FILTER (WHERE p.amount_minor < 0), 0) AS credits,
                  count(*) AS postings
             FROM ledger_postings p
             JOIN ledger_accounts a ON a.id = p.account_id
             JOIN tenants t ON t.id = p.tenant_id
            WHERE $1::uuid IS NULL OR p.tenant_id = $1
            GROUP BY t.id, t.name, a.code, a.kind, p.currency
            ORDER BY t.name, a.code, p.currency""",
        tenant_id,
    )
    return [
        AccountBalance(
            tenant_id=row["tenant_id"],
            tenant_name=row["tenant_name"],
            account=row["code"],
            kind=AccountKind(row["kind"]),
            currency=row["currency"],
            debits_minor=int(row["debits"]),
            credits_minor=int(row["credits"]),
            postings=row["postings"],
        )
        for row in rows
    ]


@dataclass(frozen=True)
class TenantRef:
    """A tenant's id and name."""

    id: uuid.UUID
    name: str


async def resolve_tenant(conn: Connection | asyncpg.Pool, name_or_id: str) -> TenantRef:
    """Find a tenant by id (a UUID string) or by name.

    Raises ``LookupError`` naming ``name_or_id`` when there is no such tenant.
    """
    try:
        tenant_id: uuid.UUID | None = uuid.UUID(name_or_id)
    except ValueError:
        tenant_id = None
    if tenant_id is not None:
        row = await conn.fetchrow("SELECT id, name FROM tenants WHERE id = $1", tenant_id)
    else:
        row = await conn.fetchrow("SELECT id, name FROM tenants WHERE name = $1", name_or_id)
    if row is None:
        raise LookupError(f"no tenant {name_or_id!r}")
    return TenantRef(row["id"], row["name"])
