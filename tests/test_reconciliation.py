"""Reconciling settlement reports with the ledger: payments/reconciliation.py, `switchboard reconcile`.

The parsers and the matching function are tested on in-memory data; the
end-to-end tests post real journals with :func:`payments.ledger.post_journal`
into a real PostgreSQL, write the processor's report from them with known
discrepancies injected, and check that reconciliation finds exactly those.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import itertools
import json
import os
import random
import re
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
from rich.console import Console

from payments.ledger import (
    Journal,
    JournalKind,
    Posting,
    account_balances,
    capture_postings,
    fee_postings,
    post_journal,
    refund_postings,
)
from payments.ledger_verify import verify_chain
from payments.reconciliation import (
    FeeJournals,
    FeeLine,
    FeeTotal,
    LedgerEntry,
    Outcome,
    ParsedReport,
    ReconciliationResult,
    ReportError,
    ReportFormat,
    ReportLine,
    ReportSource,
    currency_exponent,
    load_ledger_entries,
    parse_adyen_report,
    parse_stripe_report,
    reconcile,
    reconcile_and_store,
    run_items,
    to_minor_units,
)
from switchboard import reconcile_cli as cli_module
from tests.conftest import TenantCredentials, make_tenant
from tests.test_ledger import ledger_cli


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on this test's database (reconciliation needs no Kafka or SMTP)."""
    created = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    assert created is not None
    yield created
    await created.close()


# --- helpers -----------------------------------------------------------------------------------------

STRIPE_COLUMNS = [
    "balance_transaction_id",
    "created_utc",
    "created",
    "available_on_utc",
    "currency",
    "gross",
    "fee",
    "net",
    "reporting_category",
    "source_id",
    "description",
    "payment_intent_id",
    "charge_id",
]
ADYEN_COLUMNS = [
    "Company Account",
    "Merchant Account",
    "Psp Reference",
    "Merchant Reference",
    "Payment Method",
    "Creation Date",
    "TimeZone",
    "Type",
    "Modification Reference",
    "Gross Currency",
    "Gross Debit (GC)",
    "Gross Credit (GC)",
    "Exchange Rate",
    "Net Currency",
    "Net Debit (NC)",
    "Net Credit (NC)",
    "Commission (NC)",
    "Markup (NC)",
    "Scheme Fees (NC)",
    "Interchange (NC)",
    "Payment Method Variant",
    "Modification Merchant Reference",
    "Batch Number",
]
#: The header and first data row of Adyen's sample Settlement details report (docs.adyen.com).
ADYEN_SAMPLE = (
    ",".join(ADYEN_COLUMNS)
    + "\nTestCompany,TestMerchant,1813702551707653,3vpzf7,visa,2013-06-03 11:26:49,CET,Settled,"
    "1713702551795048,GBP,,5.00,1,GBP,,4.88,,0.04,0.01,0.07,visaclassic,,4\n"
)


def major(amount_minor: int, currency: str) -> str:
    """Minor units as the decimal major-unit string a report shows (1050 EUR -> "10.50")."""
    return f"{Decimal(amount_minor).scaleb(-currency_exponent(currency)):f}"


def csv_text(columns: Sequence[str], rows: Sequence[dict[str, str]]) -> str:
    """A CSV report: header plus rows (absent cells empty)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def stripe_time(moment: datetime) -> str:
    """``created_utc`` as Stripe writes it (whole seconds, UTC)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def stripe_row(
    category: str,
    gross: int,
    currency: str,
    moment: datetime,
    *,
    fee: int = 0,
    source: str = "",
    payment_intent: str = "",
    charge: str = "",
) -> dict[str, str]:
    """One itemized balance-report row; amounts in minor units, written in major units."""
    return {
        "balance_transaction_id": f"txn_{uuid.uuid4().hex[:16]}",
        "created_utc": stripe_time(moment),
        "created": stripe_time(moment),
        "available_on_utc": stripe_time(moment + timedelta(days=2)),
        "currency": currency.lower(),
        "gross": major(gross, currency),
        "fee": major(fee, currency),
        "net": major(gross - fee, currency),
        "reporting_category": category,
        "source_id": source,
        "description": f"{category} {source}",
        "payment_intent_id": payment_intent,
        "charge_id": charge,
    }


@dataclass(frozen=True)
class Spec:
    """A journal to post: kind, reference, amount (minor units), currency, processor."""

    kind: JournalKind
    reference: str
    amount: int
    currency: str
    processor: str = "stripe"

    def postings(self) -> list[Posting]:
        """The journal's postings (payments.ledger builders)."""
        build = {JournalKind.CAPTURE: capture_postings, JournalKind.REFUND: refund_postings}
        return build.get(self.kind, fee_postings)(self.processor, self.amount, self.currency)


async def post_all(
    pool: asyncpg.Pool, tenant_id: uuid.UUID, specs: Sequence[Spec], *, batch: int = 2500
) -> list[Journal]:
    """Post ``specs`` with post_journal, ``batch`` journals per transaction.

    A fresh test database has no planner statistics, which makes each
    post_journal slower the more journals there are (production has
    autovacuum); so after the first 300 journals the ledger tables are ANALYZEd.
    """
    posted: list[Journal] = []
    bounds = [0, min(300, len(specs)), *range(300 + batch, len(specs), batch), len(specs)]
    for start, end in itertools.pairwise(bounds):
        async with pool.acquire() as conn:
            async with conn.transaction():
                for spec in specs[start:end]:
                    posted.append(
                        await post_journal(
                            conn,
                            tenant_id,
                            kind=spec.kind,
                            payment_id=None,
                            reference=spec.reference,
                            idempotency_key=f"{spec.kind}:{spec.reference}",
                            postings=spec.postings(),
                        )
                    )
            if start == 0 and end < len(specs):
                await conn.execute("ANALYZE ledger_journals, ledger_postings, ledger_accounts")
    return posted


def refs(result: ReconciliationResult, outcome: Outcome) -> set[str]:
    """The references of ``outcome``'s items."""
    return {item.reference for item in result.of(outcome)}


def entry(
    kind: JournalKind, reference: str, amount: int, currency: str, seq: int, at: datetime
) -> LedgerEntry:
    """An in-memory ledger entry."""
    return LedgerEntry(uuid.UUID(int=seq), seq, kind, reference, amount, currency, at)


T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


# --- amounts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "currency", "minor"),
    [
        ("10.50", "EUR", 1050),
        ("-10.5", "eur", -1050),
        ("0.00", "USD", 0),
        ("500", "JPY", 500),
        ("500.00", "JPY", 500),
        ("1200", "KRW", 1200),
        ("1.234", "BHD", 1234),
        ("-0.005", "KWD", -5),
        ("1000.00", "ISK", 1000),
        ("92233720368547758.07", "EUR", 9223372036854775807),
    ],
)
def test_major_units_become_exact_minor_units(value: str, currency: str, minor: int) -> None:
    assert to_minor_units(value, currency) == minor


@pytest.mark.parametrize(
    ("value", "currency", "message"),
    [
        ("10.505", "EUR", "10.505 has more decimals than EUR's 2"),
        ("1.5", "JPY", "1.5 has more decimals than JPY's 0"),
        ("1e3", "EUR", "is not a decimal number"),
        ("1,000.00", "EUR", "is not a decimal number"),
        ("NaN", "EUR", "is not a decimal number"),
        ("", "EUR", "is not a decimal number"),
        ("1.00", "EUX", "'EUX' is not an ISO 4217 currency code"),
        ("1.00", "XAU", "ISO 4217 currency XAU has no minor unit"),
    ],
)
def test_bad_amounts_are_refused(value: str, currency: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        to_minor_units(value, currency)


# --- the Stripe parser -------------------------------------------------------------------------------


def test_stripe_report_lines_fees_skips_and_period() -> None:
    rows = [
        stripe_row("charge", 1050, "EUR", T0, fee=45, source="ch_1", payment_intent="pi_1", charge="ch_1"),
        stripe_row("refund", -300, "EUR", T0 + timedelta(seconds=5), source="re_1", payment_intent="pi_1"),
        stripe_row("charge", 500, "JPY", T0 + timedelta(seconds=9), fee=20, source="py_2"),
        stripe_row("payout", -1000, "EUR", T0 - timedelta(hours=1), source="po_1"),
        stripe_row("dispute", -200, "EUR", T0 + timedelta(hours=1), fee=1500, source="dp_1"),
        stripe_row("fee", -2500, "EUR", T0 + timedelta(seconds=7), source="ba_fee"),
    ]
    report = parse_stripe_report(io.StringIO(csv_text(STRIPE_COLUMNS, rows)))

    assert report.format is ReportFormat.STRIPE
    assert report.rows == 6
    assert report.skipped == (("dispute", 1), ("payout", 1))
    charge, refund, jpy = report.lines
    assert charge == ReportLine(
        line=2,
        kind=JournalKind.CAPTURE,
        references=("pi_1", "ch_1"),
        amount_minor=1050,
        currency="EUR",
        occurred_at=T0,
        category="charge",
        fee_minor=45,
        fee_currency="EUR",
        line_id=rows[0]["balance_transaction_id"],
    )
    assert (refund.kind, refund.references, refund.amount_minor, refund.line) == (
        JournalKind.REFUND,
        ("re_1", "pi_1"),
        300,
        3,
    )
    assert (jpy.references, jpy.amount_minor, jpy.currency, jpy.fee_minor) == (("py_2",), 500, "JPY", 20)
    assert [(f.line, f.amount_minor, f.currency, f.line_id) for f in report.fee_lines] == [
        (7, 2500, "EUR", rows[5]["balance_transaction_id"])
    ]
    # skipped rows still belong to the report's period; the end is exclusive, one second after
    assert report.period_start == T0 - timedelta(hours=1)
    assert report.period_end == T0 + timedelta(hours=1, seconds=1)
    # Fees are looked up by the balance transaction that withheld them (their fee journals' reference).
    fee_transactions = {rows[n]["balance_transaction_id"] for n in (0, 2, 5)}
    assert report.fee_references() == fee_transactions
    assert report.references() == {"pi_1", "ch_1", "re_1", "py_2"} | fee_transactions


def test_stripe_line_numbers_count_physical_lines_and_errors_name_the_column() -> None:
    good = stripe_row("charge", 1050, "EUR", T0, source="ch_1")
    good["description"] = "a description\nthat spans\nthree lines"
    bad = stripe_row("charge", 1050, "EUR", T0, source="ch_2")
    bad["gross"] = "10.5O"
    text = csv_text(STRIPE_COLUMNS, [good, bad])
    with pytest.raises(ReportError, match=r"line 5, column 'gross': '10.5O' is not a decimal number") as info:
        parse_stripe_report(io.StringIO(text))
    assert (info.value.line, info.value.column) == (5, "gross")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"currency": "eurx"}, "line 2, column 'currency': 'EURX' is not an ISO 4217 currency code"),
        ({"gross": "10.505"}, "line 2, column 'gross': 10.505 has more decimals than EUR's 2"),
        ({"net": "10.00"}, "line 2, column 'net': 10.00 is not gross - fee"),
        ({"created_utc": "yesterday"}, "line 2, column 'created_utc': 'yesterday' is not a date and time"),
        ({"source_id": ""}, "line 2, column 'payment_intent_id': no reference"),
    ],
)
def test_stripe_malformed_rows(change: dict[str, str], message: str) -> None:
    row = stripe_row("charge", 1050, "EUR", T0, fee=30, source="ch_1") | change
    with pytest.raises(ReportError, match=message):
        parse_stripe_report(io.StringIO(csv_text(STRIPE_COLUMNS, [row])))


def test_stripe_header_must_have_the_needed_columns() -> None:
    with pytest.raises(ReportError, match="line 1, column 'gross': the header has no such column"):
        parse_stripe_report(io.StringIO("created_utc,currency,net,reporting_category,source_id\n"))
    with pytest.raises(ReportError, match="the header needs one of the columns created_utc, created"):
        parse_stripe_report(io.StringIO("currency,gross,reporting_category,source_id\n"))
    with pytest.raises(ReportError, match="line 1: the report is empty"):
        parse_stripe_report(io.StringIO(""))


def test_stripe_skipped_rows_may_be_incomplete() -> None:
    payout = {"reporting_category": "payout", "created_utc": "not a time", "gross": "x"}
    report = parse_stripe_report(io.StringIO(csv_text(STRIPE_COLUMNS, [payout])))
    assert (report.rows, report.lines, report.skipped, report.period_start) == (1, (), (("payout", 1),), None)


# --- the Adyen parser --------------------------------------------------------------------------------


def test_adyen_sample_row_from_the_docs() -> None:
    report = parse_adyen_report(io.StringIO(ADYEN_SAMPLE))
    (line,) = report.lines
    assert line == ReportLine(
        line=2,
        kind=JournalKind.CAPTURE,
        references=("1813702551707653", "1713702551795048"),
        amount_minor=500,
        currency="GBP",
        occurred_at=datetime(2013, 6, 3, 10, 26, 49, tzinfo=UTC),  # 11:26:49 CET
        category="Settled",
        fee_minor=12,  # 5.00 gross - 4.88 net = markup 0.04 + scheme fees 0.01 + interchange 0.07
        fee_currency="GBP",
        line_id="1713702551795048",
    )


def adyen_row(
    kind: str,
    psp: str,
    modification: str,
    currency: str,
    moment: datetime,
    *,
    debit: int | None = None,
    credit: int | None = None,
    fees: tuple[int, int, int, int] = (0, 0, 0, 0),
    zone: str = "CET",
    net_currency: str | None = None,
) -> dict[str, str]:
    """One Settlement details row; amounts in minor units, time written in ``zone`` (CET = UTC+1).

    Fees are commission, markup, scheme fees, interchange in ``net_currency`` (default: ``currency``).
    """
    offset = {"CET": 1, "CEST": 2, "UTC": 0}[zone]
    local = moment.astimezone(timezone(timedelta(hours=offset)))
    gross = (credit or 0) - (debit or 0)
    net = gross - sum(fees)
    net_currency = net_currency or currency
    return {
        "Company Account": "TestCompany",
        "Merchant Account": "TestMerchant",
        "Psp Reference": psp,
        "Merchant Reference": f"order-{psp[-4:]}",
        "Payment Method": "visa",
        "Creation Date": local.strftime("%Y-%m-%d %H:%M:%S"),
        "TimeZone": zone,
        "Type": kind,
        "Modification Reference": modification,
        "Gross Currency": currency,
        "Gross Debit (GC)": "" if debit is None else major(debit, currency),
        "Gross Credit (GC)": "" if credit is None else major(credit, currency),
        "Exchange Rate": "1",
        "Net Currency": net_currency,
        "Net Debit (NC)": major(-net, net_currency) if net < 0 else "",
        "Net Credit (NC)": major(net, net_currency) if net > 0 else "",
        "Commission (NC)": major(fees[0], net_currency) if fees[0] else "",
        "Markup (NC)": major(fees[1], net_currency) if fees[1] else "",
        "Scheme Fees (NC)": major(fees[2], net_currency) if fees[2] else "",
        "Interchange (NC)": major(fees[3], net_currency) if fees[3] else "",
        "Payment Method Variant": "visaclassic",
        "Modification Merchant Reference": "",
        "Batch Number": "4",
    }


def adyen_fee_row(amount: int, currency: str, moment: datetime) -> dict[str, str]:
    """A monthly ``Fee`` row (Transaction Fees) debiting ``amount`` minor units."""
    row = dict.fromkeys(ADYEN_COLUMNS, "")
    row |= {
        "Company Account": "TestCompany",
        "Merchant Account": "TestMerchant",
        "Creation Date": moment.strftime("%Y-%m-%d %H:%M:%S"),
        "TimeZone": "UTC",
        "Type": "Fee",
        "Modification Reference": "Transaction Fees May 2026",
        "Net Currency": currency,
        "Net Debit (NC)": major(amount, currency),
        "Batch Number": "4",
    }
    return row


def test_adyen_types_time_zones_and_errors() -> None:
    rows = [
        adyen_row(
            "Refunded", "1000000000000001", "2000000000000001", "EUR", T0, debit=300, fees=(0, 0, 0, 5)
        ),
        adyen_row("RefundedReversed", "1000000000000001", "2000000000000001", "EUR", T0, credit=300),
        adyen_row("MerchantPayout", "", "", "EUR", T0 + timedelta(days=1), debit=9000),
        adyen_fee_row(1234, "EUR", T0 - timedelta(days=1)),
        adyen_row("Settled", "1000000000000002", "3000000000000002", "JPY", T0, credit=5000, zone="CEST"),
    ]
    report = parse_adyen_report(io.StringIO(csv_text(ADYEN_COLUMNS, rows)))
    refund, reversed_refund, settled = report.lines
    assert (refund.kind, refund.references, refund.amount_minor, refund.fee_minor) == (
        JournalKind.REFUND,
        ("2000000000000001", "1000000000000001"),
        300,
        5,
    )
    assert (reversed_refund.kind, reversed_refund.amount_minor) == (JournalKind.REFUND, -300)
    assert (settled.amount_minor, settled.currency, settled.occurred_at) == (5000, "JPY", T0)
    assert [(f.amount_minor, f.currency, f.category) for f in report.fee_lines] == [(1234, "EUR", "Fee")]
    assert report.skipped == (("MerchantPayout", 1),)
    assert report.period_start == T0 - timedelta(days=1)

    no_amount = rows[4] | {"Gross Credit (GC)": ""}
    with pytest.raises(ReportError, match=r"line 2, column 'Gross Credit \(GC\)': a Settled row needs"):
        parse_adyen_report(io.StringIO(csv_text(ADYEN_COLUMNS, [no_amount])))
    odd_zone = rows[4] | {"TimeZone": "Mars/Olympus"}
    with pytest.raises(ReportError, match="line 2, column 'TimeZone': unknown time zone 'Mars/Olympus'"):
        parse_adyen_report(io.StringIO(csv_text(ADYEN_COLUMNS, [odd_zone])))
    iana = parse_adyen_report(io.StringIO(csv_text(ADYEN_COLUMNS, [rows[4] | {"TimeZone": "Asia/Tokyo"}])))
    assert iana.lines[0].occurred_at == T0 + timedelta(hours=2) - timedelta(hours=9)


# --- matching (pure) ---------------------------------------------------------------------------------


def line(
    n: int,
    kind: JournalKind,
    references: tuple[str, ...],
    amount: int,
    currency: str = "EUR",
    *,
    fee_minor: int = 0,
    fee_currency: str = "",
) -> ReportLine:
    """An in-memory report line at T0 + n seconds."""
    moment = T0 + timedelta(seconds=n)
    return ReportLine(n, kind, references, amount, currency, moment, "test", fee_minor, fee_currency)


def report_of(*lines: ReportLine, fee_lines: tuple[FeeLine, ...] = ()) -> ParsedReport:
    """A report holding ``lines`` whose period is T0 .. T0 + 1 h."""
    return ParsedReport(ReportFormat.STRIPE, len(lines), lines, fee_lines, (), T0, T0 + timedelta(hours=1))


def test_matching_rules_each_outcome_and_reference_preference() -> None:
    C, R = JournalKind.CAPTURE, JournalKind.REFUND
    report = report_of(
        line(1, C, ("pi_match", "ch_match"), 1000),
        line(2, C, ("pi_charge_booked", "ch_booked"), 700),  # the ledger booked the charge id
        line(3, C, ("pi_amount",), 999),
        line(4, C, ("pi_currency",), 500, "USD"),
        line(5, C, ("pi_nowhere", "ch_nowhere"), 100),
        line(6, R, ("re_new", "pi_match"), 50),  # a refund never falls back onto a capture's reference
        line(7, C, ("pi_partial",), 1000),
        line(8, C, ("pi_partial",), -400),  # partial capture reversal: 600 captured
        line(9, C, ("pi_twice",), 100),
        line(10, C, ("pi_twice",), 100),  # a duplicated line
    )
    ledger = [
        entry(C, "pi_match", 1000, "EUR", 1, T0),
        entry(C, "ch_booked", 700, "EUR", 2, T0),
        entry(C, "pi_amount", 1000, "EUR", 3, T0),
        entry(C, "pi_currency", 500, "EUR", 4, T0),
        entry(C, "pi_partial", 600, "EUR", 5, T0),
        entry(C, "pi_twice", 100, "EUR", 6, T0),
        entry(R, "re_lost", 40, "EUR", 7, T0 + timedelta(minutes=5)),  # inside the period
        entry(R, "re_old", 40, "EUR", 8, T0 - timedelta(days=1)),  # outside: not this report's business
        entry(C, "pi_late", 40, "EUR", 9, T0 + timedelta(hours=1)),  # the period end is exclusive
    ]
    result = reconcile(report, ledger)

    assert refs(result, Outcome.MATCHED) == {"pi_match", "ch_booked", "pi_partial"}
    assert refs(result, Outcome.CONFLICTED) == {"pi_amount", "pi_currency", "pi_twice"}
    assert refs(result, Outcome.MISSING_IN_LEDGER) == {"pi_nowhere", "re_new"}
    assert refs(result, Outcome.MISSING_IN_REPORT) == {"re_lost"}
    by_ref = {item.reference: item for item in result.items}
    assert by_ref["pi_amount"].detail == "amount differs: report 999 EUR, ledger 1000 EUR"
    assert (by_ref["pi_amount"].report, by_ref["pi_amount"].ledger) == ((("EUR", 999),), (("EUR", 1000),))
    assert by_ref["pi_currency"].detail == "currency differs: report 500 USD, ledger 500 EUR"
    assert (
        by_ref["pi_twice"].detail
        == "amount differs: report 200 EUR, ledger 100 EUR (2 report lines, 1 journals)"
    )
    assert by_ref["pi_partial"].lines == (7, 8)
    assert by_ref["re_lost"].journal_ids == (uuid.UUID(int=7),)
    assert by_ref["re_lost"].ledger == (("EUR", 40),)
    assert result.counts == {
        Outcome.CONFLICTED: 3,
        Outcome.MISSING_IN_LEDGER: 2,
        Outcome.MISSING_IN_REPORT: 1,
        Outcome.MATCHED: 3,
    }
    assert (result.ok, result.discrepancies) == (False, 6)
    assert [item.outcome for item in result.items] == sorted(
        (item.outcome for item in result.items), key=list(Outcome).index
    )


def test_matching_is_deterministic_whatever_the_input_order() -> None:
    C = JournalKind.CAPTURE
    lines = [line(n, C, (f"pi_{n % 7}",), n) for n in range(1, 60)]
    ledger = [entry(C, f"pi_{n}", n * 100, "EUR", n + 1, T0) for n in range(10)]
    first = reconcile(report_of(*lines), ledger)
    shuffler = random.Random(7)
    for _ in range(5):
        shuffler.shuffle(lines)
        shuffler.shuffle(ledger)
        again = reconcile(report_of(*sorted(lines, key=lambda x: x.line)), ledger)
        assert again.items == first.items
        assert again.fees == first.fees


def test_fees_are_compared_only_when_the_ledger_books_them() -> None:
    C, F = JournalKind.CAPTURE, JournalKind.FEE
    report = report_of(
        line(1, C, ("pi_1",), 1000, fee_minor=30, fee_currency="EUR"),
        line(2, C, ("pi_2",), 2000, "USD", fee_minor=60, fee_currency="USD"),
    )
    captures = [entry(C, "pi_1", 1000, "EUR", 1, T0), entry(C, "pi_2", 2000, "USD", 2, T0)]
    unbooked = reconcile(report, captures)
    assert unbooked.fees == (FeeTotal("EUR", 30, None), FeeTotal("USD", 60, None))
    assert unbooked.ok

    # a fee journal of a reported payment counts even when posted after the period
    late_fee = entry(F, "pi_1", 30, "EUR", 3, T0 + timedelta(days=2))
    booked = reconcile(report, [*captures, late_fee])
    assert booked.fees == (FeeTotal("EUR", 30, 30), FeeTotal("USD", 60, 0))
    assert booked.fee_mismatches == (FeeTotal("USD", 60, 0),)
    assert booked.fee_mismatches[0].difference_minor == 60
    assert (booked.ok, booked.discrepancies) == (False, 1)
    assert refs(booked, Outcome.MATCHED) == {"pi_1", "pi_2"}  # fee journals are never line items


def test_an_empty_report_has_no_period_and_misses_nothing() -> None:
    report = parse_stripe_report(io.StringIO(",".join(STRIPE_COLUMNS) + "\n"))
    result = reconcile(report, [entry(JournalKind.CAPTURE, "pi_1", 1, "EUR", 1, T0)])
    assert (result.rows, result.items, result.period_start, result.ok) == (0, (), None, True)


# --- against the ledger ------------------------------------------------------------------------------

CURRENCIES = ("EUR", "USD", "JPY", "BHD")


async def test_ten_thousand_row_stripe_report(pool: asyncpg.Pool, tenant: TenantCredentials) -> None:
    started = time.perf_counter()
    captures = [
        Spec(JournalKind.CAPTURE, f"pi_{i:05d}", 100 + (i * 37) % 90_000, CURRENCIES[i % 4])
        for i in range(8000)
    ]
    refunds = [
        Spec(JournalKind.REFUND, f"re_{i:05d}", captures[4 * i].amount // 2, captures[4 * i].currency)
        for i in range(2000)
    ]
    journals = await post_all(pool, tenant.tenant_id, [*captures, *refunds])
    posted = time.perf_counter()
    assert len(journals) == 10_000

    rows: list[dict[str, str]] = []
    fees: dict[str, int] = defaultdict(int)
    for n, journal in enumerate(journals):
        spec = captures[n] if n < 8000 else refunds[n - 8000]
        if spec.kind is JournalKind.CAPTURE:
            fee = spec.amount * 3 // 100
            fees[spec.currency] += fee
            rows.append(
                stripe_row(
                    "charge",
                    spec.amount,
                    spec.currency,
                    journal.created_at,
                    fee=fee,
                    source=f"ch_{n:05d}",
                    payment_intent=spec.reference,
                    charge=f"ch_{n:05d}",
                )
            )
        else:
            payment = (n - 8000) * 4
            rows.append(
                stripe_row(
                    "refund",
                    -spec.amount,
                    spec.currency,
                    journal.created_at,
                    source=spec.reference,
                    payment_intent=f"pi_{payment:05d}",
                    charge=f"ch_{payment:05d}",
                )
            )

    # the discrepancies: 5 capture and 2 refund amounts, 3 currencies, 5 lines unknown to the
    # ledger, 4 journals left out of the report
    amount_changed = {10: 1, 2010: -1, 4010: 100, 6010: 1, 7010: 2, 8500: 1, 9500: -1}
    for n, delta in amount_changed.items():
        spec = captures[n] if n < 8000 else refunds[n - 8000]
        sign = 1 if spec.kind is JournalKind.CAPTURE else -1
        fee = spec.amount * 3 // 100 if spec.kind is JournalKind.CAPTURE else 0
        rows[n] |= {
            "gross": major(sign * (spec.amount + delta), spec.currency),
            "net": major(sign * (spec.amount + delta) - fee, spec.currency),
        }
    currency_changed = {100: "gbp", 204: "gbp", 3000: "chf"}  # EUR captures, so the decimals still fit
    for n, currency in currency_changed.items():
        rows[n]["currency"] = currency
        fees["EUR"] -= captures[n].amount * 3 // 100
        fees[currency.upper()] += captures[n].amount * 3 // 100
    left_out = [1500, 5555, 8100, 9000]
    middle = journals[5000].created_at
    extra = [
        stripe_row(
            "charge", 1234, "EUR", middle, fee=40, source="ch_x1", payment_intent="pi_x1", charge="ch_x1"
        ),
        stripe_row("charge", 99, "USD", middle, fee=3, source="py_x2", payment_intent="pi_x2"),
        stripe_row("charge", 5000, "JPY", middle, fee=150, source="ch_x3"),
        stripe_row("refund", -10, "EUR", middle, source="re_x4", payment_intent="pi_00000"),
        stripe_row("refund", -20, "USD", middle, source="re_x5", payment_intent="pi_00001"),
    ]
    fees["EUR"] += 40
    fees["USD"] += 3
    fees["JPY"] += 150
    skipped = [
        stripe_row("payout", -50_000, "EUR", middle, source="po_1"),
        stripe_row("payout", -60_000, "USD", middle, source="po_2"),
        stripe_row("payout", -70_000, "EUR", middle, source="po_3"),
        stripe_row("dispute", -1000, "EUR", middle, fee=1500, source="dp_1"),
        stripe_row("dispute", -2000, "USD", middle, fee=1500, source="dp_2"),
        stripe_row("fee", -2500, "EUR", middle, source="radar_fees"),
    ]
    fees["EUR"] += 2500
    for n in left_out:
        if n < 8000:
            fees[captures[n].currency] -= captures[n].amount * 3 // 100
    kept = [row for n, row in enumerate(rows) if n not in left_out]
    report_rows = kept + extra + skipped
    random.Random(42).shuffle(report_rows)  # report order is not ledger order
    text = csv_text(STRIPE_COLUMNS, report_rows)

    # another tenant's journal under an unknown reference never matches
    globex = await make_tenant(pool, "globex")
    await post_all(pool, globex.tenant_id, [Spec(JournalKind.CAPTURE, "pi_x1", 1234, "EUR")])

    parsed = parse_stripe_report(io.StringIO(text))
    assert parsed.rows == 10_007
    async with pool.acquire() as conn:
        stored = await reconcile_and_store(
            conn, tenant.tenant_id, "stripe", parsed, ReportSource("balance.csv", bytes(32))
        )
    result = stored.result
    finished = time.perf_counter()

    conflicted = {item.reference: item for item in result.of(Outcome.CONFLICTED)}
    amount_refs = {(captures[n] if n < 8000 else refunds[n - 8000]).reference for n in amount_changed}
    currency_refs = {captures[n].reference for n in currency_changed}
    assert set(conflicted) == amount_refs | currency_refs
    for reference in amount_refs:
        assert conflicted[reference].detail.startswith("amount differs")
    assert conflicted["pi_04010"].report == ((captures[4010].currency, captures[4010].amount + 100),)
    assert conflicted["pi_04010"].ledger == ((captures[4010].currency, captures[4010].amount),)
    assert conflicted["re_00500"].kind is JournalKind.REFUND
    for reference in currency_refs:
        assert conflicted[reference].detail.startswith("currency differs")
    assert conflicted["pi_03000"].report == (("CHF", captures[3000].amount),)
    assert conflicted["pi_03000"].ledger == (("EUR", captures[3000].amount),)
    assert refs(result, Outcome.MISSING_IN_LEDGER) == {"pi_x1", "pi_x2", "ch_x3", "re_x4", "re_x5"}
    missing_in_report = {journals[n].reference for n in left_out}
    assert refs(result, Outcome.MISSING_IN_REPORT) == missing_in_report
    assert {i.journal_ids for i in result.of(Outcome.MISSING_IN_REPORT)} == {
        (journals[n].id,) for n in left_out
    }
    assert result.counts[Outcome.MATCHED] == 10_000 - 4 - 10
    assert result.skipped == (("dispute", 2), ("payout", 3))
    assert result.fees == tuple(FeeTotal(c, fees[c], None) for c in sorted(fees))
    assert (result.ok, result.discrepancies) == (False, 10 + 5 + 4)
    # Every fee of the report is now a fee journal, once per balance transaction.
    fee_rows = sum(
        1
        for row in report_rows
        if row["reporting_category"] == "fee"
        or (row["reporting_category"] in ("charge", "refund") and Decimal(row["fee"]) != 0)
    )
    assert fee_rows == 8000 - 2 + 3 + 1  # kept charges, the unknown charges, the Radar fee line
    assert stored.fee_journals == FeeJournals(
        posted=fee_rows, posted_minor=tuple(sorted(fees.items())), already_posted=0, conflicting=0
    )

    async with pool.acquire() as conn:
        run = await conn.fetchrow("SELECT * FROM reconciliation_runs WHERE id = $1", stored.run_id)
        assert run is not None
        assert (run["tenant_id"], run["processor"], run["report_format"], run["report_rows"]) == (
            tenant.tenant_id,
            "stripe",
            "stripe",
            10_007,
        )
        assert (run["matched"], run["conflicted"], run["missing_in_ledger"], run["missing_in_report"]) == (
            9986,
            10,
            5,
            4,
        )
        assert run["ok"] is False
        assert json.loads(run["skipped"]) == {"dispute": 2, "payout": 3}
        stored_items = await conn.fetchval(
            "SELECT count(*) FROM reconciliation_items WHERE run_id = $1", stored.run_id
        )
        assert stored_items == len(result.items)
        assert await run_items(conn, tenant.tenant_id, stored.run_id, outcome=Outcome.CONFLICTED) == list(
            result.of(Outcome.CONFLICTED)
        )
        assert await run_items(conn, globex.tenant_id, stored.run_id) == []
    print(
        f"posting 10,000 journals {posted - started:.1f} s, reconciling {finished - posted:.1f} s "
        f"(with {stored.fee_journals.posted} fee journals posted)"
    )
    assert finished - posted < 10


async def test_adyen_report_with_fees_against_the_ledger(
    pool: asyncpg.Pool, tenant: TenantCredentials
) -> None:
    payments = [f"88{i:014d}" for i in range(40)]
    captures = [
        Spec(JournalKind.CAPTURE, psp, 1000 + 25 * i, "EUR", "adyen") for i, psp in enumerate(payments)
    ]
    refunds = [Spec(JournalKind.REFUND, f"99{i:014d}", 500, "EUR", "adyen") for i in range(10)]
    fee_of = {psp: (0, 5, 3, 10 + i) for i, psp in enumerate(payments)}  # markup, scheme fees, interchange
    fee_journals = [Spec(JournalKind.FEE, psp, sum(fee_of[psp]), "EUR", "adyen") for psp in payments]
    journals = await post_all(pool, tenant.tenant_id, [*captures, *refunds, *fee_journals])
    # a Stripe journal of the same tenant is another processor's business
    (stripe_journal,) = await post_all(pool, tenant.tenant_id, [Spec(JournalKind.CAPTURE, "pi_s", 5, "EUR")])

    rows = []
    for i, (spec, journal) in enumerate(zip(captures, journals[:40], strict=True)):
        rows.append(
            adyen_row(
                "Settled",
                spec.reference,
                f"77{i:014d}",
                "USD" if i == 25 else "EUR",  # settled in another currency
                journal.created_at,
                credit=spec.amount + {3: 1, 17: -10}.get(i, 0),  # two amounts differ
                fees=fee_of[spec.reference],
                net_currency="EUR",
            )
        )
    for i, (spec, journal) in enumerate(zip(refunds, journals[40:50], strict=True)):
        if i == 4:
            continue  # a refund missing from the report
        rows.append(adyen_row("Refunded", payments[i], spec.reference, "EUR", journal.created_at, debit=500))
    middle = journals[20].created_at
    rows += [
        adyen_row("Settled", "8800000000009999", "7700000000009999", "EUR", middle, credit=100),
        adyen_row("Refunded", payments[0], "9900000000009999", "EUR", middle, debit=100),
        adyen_row("MerchantPayout", "", "", "EUR", middle, debit=50_000),
        adyen_row("Chargeback", payments[1], "5500000000000001", "EUR", middle, debit=1025),
        adyen_fee_row(700, "EUR", middle),
    ]
    report = parse_adyen_report(io.StringIO(csv_text(ADYEN_COLUMNS, rows)))

    async with pool.acquire() as conn:
        stored = await reconcile_and_store(
            conn,
            tenant.tenant_id,
            "adyen",
            report,
            ReportSource("settlement_detail_report_batch_4.csv", bytes(32)),
        )
        entries = await load_ledger_entries(conn, tenant.tenant_id, "adyen", references=["pi_s"], period=None)
    result = stored.result

    assert refs(result, Outcome.CONFLICTED) == {payments[3], payments[17], payments[25]}
    assert refs(result, Outcome.MISSING_IN_LEDGER) == {"8800000000009999", "9900000000009999"}
    assert refs(result, Outcome.MISSING_IN_REPORT) == {refunds[4].reference}
    assert result.counts[Outcome.MATCHED] == 40 - 3 + 9
    assert result.skipped == (("Chargeback", 1), ("MerchantPayout", 1))
    # the per-line fees match the fee journals; the monthly Fee row (7.00 EUR) is not booked
    booked = sum(sum(f) for f in fee_of.values())
    assert result.fees == (FeeTotal("EUR", booked + 700, booked),)
    assert result.fee_mismatches[0].difference_minor == 700
    assert (result.ok, result.discrepancies) == (False, 3 + 2 + 1 + 1)
    conflict = next(i for i in result.of(Outcome.CONFLICTED) if i.reference == payments[25])
    assert conflict.detail == "currency differs: report 1625 USD, ledger 1625 EUR"
    assert stripe_journal.id not in {j for item in result.items for j in item.journal_ids}
    assert entries == []


# --- fees become fee journals ------------------------------------------------------------------------


async def test_report_fees_become_fee_journals_once_and_show_in_the_balance(
    pool: asyncpg.Pool, database_url: str, tenant: TenantCredentials
) -> None:
    payment_a = uuid.uuid4()
    async with pool.acquire() as conn, conn.transaction():
        capture = await post_journal(
            conn,
            tenant.tenant_id,
            kind=JournalKind.CAPTURE,
            payment_id=payment_a,
            reference="pi_a",
            idempotency_key=f"capture:{payment_a}",
            postings=capture_postings("stripe", 1050, "EUR"),
        )
        adyen_capture = await post_journal(
            conn,
            tenant.tenant_id,
            kind=JournalKind.CAPTURE,
            payment_id=None,
            reference="8800000000000001",
            idempotency_key="capture:adyen-1",
            postings=capture_postings("adyen", 500, "GBP"),
        )
    at = capture.created_at
    stripe_rows = [
        stripe_row("charge", 1050, "EUR", at, fee=45, source="ch_a", payment_intent="pi_a"),
        stripe_row("charge", 700, "EUR", at, fee=30, source="ch_c", payment_intent="pi_c"),  # not booked
        stripe_row("fee", -2500, "EUR", at, source="radar_fees"),  # a standalone fee
        stripe_row("fee", 300, "EUR", at, source="fee_refund"),  # a fee given back
        stripe_row("payout", -1000, "EUR", at, source="po_1"),
    ]
    stripe_report = parse_stripe_report(io.StringIO(csv_text(STRIPE_COLUMNS, stripe_rows)))
    source = ReportSource("balance.csv", bytes(32))

    async with pool.acquire() as conn:
        first = await reconcile_and_store(conn, tenant.tenant_id, "stripe", stripe_report, source)
        again = await reconcile_and_store(conn, tenant.tenant_id, "stripe", stripe_report, source)
    assert first.fee_journals == FeeJournals(posted=4, posted_minor=(("EUR", 45 + 30 + 2500 - 300),))
    assert first.result.fees == (FeeTotal("EUR", 2275, None),)  # compared before they were posted
    # A second import of the same report posts nothing more, and now compares the fees.
    assert again.fee_journals == FeeJournals(posted=0, already_posted=4)
    assert again.result.fees == (FeeTotal("EUR", 2275, 2275),)
    fee_journals = await pool.fetch(
        "SELECT reference, payment_id, idempotency_key FROM ledger_journals WHERE kind = 'fee' ORDER BY seq"
    )
    assert [(r["reference"], r["payment_id"]) for r in fee_journals] == [
        (stripe_rows[0]["balance_transaction_id"], payment_a),  # the fee of the booked capture
        (stripe_rows[1]["balance_transaction_id"], None),
        (stripe_rows[2]["balance_transaction_id"], None),
        (stripe_rows[3]["balance_transaction_id"], None),
    ]
    assert fee_journals[0]["idempotency_key"] == f"fee:stripe:{stripe_rows[0]['balance_transaction_id']}"

    # Adyen: the per-line fee is commission + markup + scheme fees + interchange, in the net currency.
    adyen = [
        adyen_row(
            "Settled", "8800000000000001", "7700000000000001", "GBP", adyen_capture.created_at,
            credit=500, fees=(10, 4, 1, 7),
        )
    ]  # fmt: skip
    adyen_report = parse_adyen_report(io.StringIO(csv_text(ADYEN_COLUMNS, adyen)))
    async with pool.acquire() as conn:
        adyen_run = await reconcile_and_store(conn, tenant.tenant_id, "adyen", adyen_report, source)
    assert adyen_run.fee_journals == FeeJournals(posted=1, posted_minor=(("GBP", 22),))

    # A report that later says another fee for the same balance transaction posts nothing for it.
    changed = [stripe_rows[0] | {"fee": "0.50", "net": "10.00"}]
    changed_report = parse_stripe_report(io.StringIO(csv_text(STRIPE_COLUMNS, changed)))
    async with pool.acquire() as conn:
        conflict = await reconcile_and_store(conn, tenant.tenant_id, "stripe", changed_report, source)
    assert conflict.fee_journals == FeeJournals(conflicting=1)
    assert conflict.result.fee_mismatches == (FeeTotal("EUR", 50, 45),)

    balances = {
        (b.account, b.currency): b.balance_minor for b in await account_balances(pool, tenant.tenant_id)
    }
    assert balances[("fees", "EUR")] == 2275
    assert balances[("processor_clearing:stripe", "EUR")] == 1050 - 2275
    assert balances[("fees", "GBP")] == 22
    assert balances[("processor_clearing:adyen", "GBP")] == 500 - 22
    assert (await verify_chain(pool, tenant.tenant_id)).ok
    shown = await ledger_cli(database_url, "balance", "--tenant", "acme")
    assert shown.returncode == 0, shown.stderr
    fee_lines = [line for line in shown.stdout.splitlines() if re.search(r"\bfees\b.*\bexpense\b", line)]
    assert any("2275 Dr" in line for line in fee_lines), shown.stdout
    assert any("22 Dr" in line for line in fee_lines), shown.stdout


# --- the command line --------------------------------------------------------------------------------


async def reconcile_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m switchboard.reconcile_cli`` against this test's database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update(SWITCHBOARD_DATABASE_URL=database_url, COLUMNS="250")
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "switchboard.reconcile_cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_cli_exit_codes_output_and_stored_runs(
    pool: asyncpg.Pool, database_url: str, tenant: TenantCredentials, tmp_path: Path
) -> None:
    a, b, r = await post_all(
        pool,
        tenant.tenant_id,
        [
            Spec(JournalKind.CAPTURE, "pi_a", 1050, "EUR"),
            Spec(JournalKind.CAPTURE, "pi_b", 2000, "USD"),
            Spec(JournalKind.REFUND, "re_a", 300, "EUR"),
        ],
    )
    charge_a = stripe_row("charge", 1050, "EUR", a.created_at, fee=45, source="ch_a", payment_intent="pi_a")
    charge_b = stripe_row("charge", 2000, "USD", b.created_at, fee=88, source="ch_b", payment_intent="pi_b")
    refund_a = stripe_row("refund", -300, "EUR", r.created_at, source="re_a", payment_intent="pi_a")
    payout = stripe_row("payout", -1000, "EUR", r.created_at, source="po_1")
    clean = tmp_path / "clean.csv"
    clean.write_text(
        "\ufeff" + csv_text(STRIPE_COLUMNS, [charge_a, charge_b, refund_a, payout]), encoding="utf-8"
    )
    off = tmp_path / "off.csv"
    wrong_b = charge_b | {"gross": "20.01", "net": "19.13"}
    unknown = stripe_row("charge", 700, "EUR", a.created_at, source="ch_c", payment_intent="pi_c")
    off.write_text(csv_text(STRIPE_COLUMNS, [charge_a, wrong_b, unknown]), encoding="utf-8")
    bad = tmp_path / "bad.csv"
    bad.write_text(csv_text(STRIPE_COLUMNS, [charge_a, charge_b | {"gross": "twenty"}]), encoding="utf-8")
    common = ("--tenant", "acme", "--processor", "stripe")
    wide = ("--since", "2000-01-01", "--until", "2100-01-01T00:00:00")

    ok_table = await reconcile_cli(database_url, *common, "--report", str(clean))
    assert ok_table.returncode == 0, ok_table.stdout + ok_table.stderr
    assert "acme / stripe: 4 report row(s)" in ok_table.stdout
    assert "skipped: payout" in ok_table.stdout
    assert "OK: everything matched" in ok_table.stdout
    ok_json = await reconcile_cli(database_url, *common, "--report", str(clean), "--format", "json")
    assert ok_json.returncode == 0, ok_json.stderr
    document = json.loads(ok_json.stdout)
    assert document["ok"] is True
    assert document["counts"] == {
        "conflicted": 0,
        "missing_in_ledger": 0,
        "missing_in_report": 0,
        "matched": 3,
    }
    # The first import posted the report's fees; this second one compares them and posts nothing.
    assert "fee journals: 2 posted (45 EUR, 88 USD)" in ok_table.stdout
    assert document["fees"] == [
        {"currency": "EUR", "report_minor": 45, "ledger_minor": 45, "ok": True},
        {"currency": "USD", "report_minor": 88, "ledger_minor": 88, "ok": True},
    ]
    assert document["fee_journals"] == {
        "posted": 0,
        "posted_minor": {},
        "already_posted": 2,
        "conflicting": 0,
        "without_reference": 0,
    }
    assert (document["skipped"], document["discrepancies"], document["rows"]) == ({"payout": 1}, [], 4)

    off_json = await reconcile_cli(database_url, *common, "--report", str(off), "--format", "json", *wide)
    assert off_json.returncode == 1, off_json.stderr
    document = json.loads(off_json.stdout)
    assert document["period_start"] == "2000-01-01T00:00:00+00:00"
    assert [(d["outcome"], d["reference"], d["report"], d["ledger"]) for d in document["discrepancies"]] == [
        ("conflicted", "pi_b", {"USD": 2001}, {"USD": 2000}),
        ("missing_in_ledger", "pi_c", {"EUR": 700}, {}),
        ("missing_in_report", "re_a", {}, {"EUR": 300}),
    ]
    assert document["discrepancies"][2]["journal_ids"] == [str(r.id)]
    off_table = await reconcile_cli(database_url, *common, "--report", str(off), *wide, "--limit", "2")
    assert off_table.returncode == 1
    assert "discrepancies (2 of 3; amounts in minor units)" in off_table.stdout
    assert "amount differs: report 2001 USD, ledger 2000 USD" in off_table.stdout
    assert "3 discrepancy(ies)" in off_table.stdout

    bad_input = await asyncio.gather(
        reconcile_cli(database_url, *common, "--report", str(bad)),
        reconcile_cli(database_url, "--tenant", "nobody", "--processor", "stripe", "--report", str(clean)),
        reconcile_cli(database_url, "--tenant", "acme", "--processor", "paypal", "--report", str(clean)),
        reconcile_cli(database_url, *common, "--report", str(tmp_path / "absent.csv")),
        reconcile_cli(database_url, *common, "--report", str(clean), "--since", "2100-01-01"),
        reconcile_cli(database_url, *common, "--report", str(clean), "--report-format", "paypal"),
    )
    assert [result.returncode for result in bad_input] == [2] * 6
    assert "bad.csv: line 3, column 'gross': 'twenty' is not a decimal number" in bad_input[0].stderr
    assert "no tenant 'nobody'" in bad_input[1].stderr
    assert "no report format for processor 'paypal': pass --report-format" in bad_input[2].stderr
    assert "no such report file" in bad_input[3].stderr
    assert "the period is empty" in bad_input[4].stderr
    assert "Invalid value for '--report-format'" in bad_input[5].stderr

    runs = await pool.fetch(
        "SELECT tenant_id, report_name, ok, matched, conflicted FROM reconciliation_runs ORDER BY id"
    )
    assert [(row["report_name"], row["ok"], row["matched"], row["conflicted"]) for row in runs] == [
        ("clean.csv", True, 3, 0),
        ("clean.csv", True, 3, 0),
        ("off.csv", False, 1, 1),
        ("off.csv", False, 1, 1),
    ]
    assert {row["tenant_id"] for row in runs} == {tenant.tenant_id}
    digests = await pool.fetch(
        "SELECT report_sha256 FROM reconciliation_runs WHERE report_name = 'clean.csv'"
    )
    assert {bytes(row["report_sha256"]) for row in digests} == {hashlib.sha256(clean.read_bytes()).digest()}


def test_progress_bar_follows_the_bytes_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [stripe_row("charge", 100 + n, "EUR", T0, source=f"ch_{n}") for n in range(2000)]
    report = tmp_path / "large.csv"
    report.write_text(csv_text(STRIPE_COLUMNS, rows), encoding="utf-8")
    screen = io.StringIO()
    monkeypatch.setattr(cli_module, "err_console", Console(file=screen, force_terminal=True, width=120))

    parsed, digest = cli_module._read_report(report, ReportFormat.STRIPE, show_progress=True)

    assert len(parsed.lines) == 2000
    assert digest == hashlib.sha256(report.read_bytes()).digest()
    size_kb = f"{report.stat().st_size / 1000:.1f}"
    assert "reading large.csv" in screen.getvalue()
    assert f"{size_kb}/{size_kb} kB" in screen.getvalue()
