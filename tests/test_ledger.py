"""The payments ledger: double entry, append-only, hash-chained per tenant (DESIGN.md "Money").

Real PostgreSQL throughout. Tampering is done as the superuser with
``session_replication_role = replica`` (which switches the ledger's triggers
off), the way an attacker with database access would.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import pytest

from payments.ledger import (
    FEES,
    GENESIS_HASH,
    MERCHANT_BALANCE,
    AccountKind,
    IdempotencyConflict,
    InvalidPosting,
    Journal,
    JournalKind,
    JournalRequest,
    NotInTransaction,
    Posting,
    UnbalancedJournal,
    account_balances,
    capture_postings,
    chain_hash,
    encode_header,
    fee_postings,
    find_journal,
    payment_journals,
    post_journal,
    post_journals,
    refund_postings,
    validate_postings,
)
from payments.ledger_verify import BreakReason, verify_chain
from tests.conftest import TenantCredentials


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on this test's database (the ledger needs no Kafka or SMTP)."""
    created = await asyncpg.create_pool(database_url, min_size=1, max_size=10)
    assert created is not None
    yield created
    await created.close()


async def post(
    pool: asyncpg.Pool,
    tenant_id: uuid.UUID,
    key: str,
    postings: Sequence[Posting],
    *,
    kind: JournalKind = JournalKind.CAPTURE,
    payment_id: uuid.UUID | None = None,
    reference: str = "",
) -> Journal:
    """Post one journal in a transaction of its own."""
    async with pool.acquire() as conn, conn.transaction():
        return await post_journal(
            conn,
            tenant_id,
            kind=kind,
            payment_id=payment_id,
            reference=reference,
            idempotency_key=key,
            postings=postings,
        )


async def counts(pool: asyncpg.Pool) -> tuple[int, int]:
    """(journals, postings) in the whole database."""
    row = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM ledger_journals) AS j, (SELECT count(*) FROM ledger_postings) AS p"
    )
    assert row is not None
    return row["j"], row["p"]


async def tamper(pool: asyncpg.Pool, sql: str, *args: Any) -> str:
    """Run ``sql`` with the ledger's triggers switched off (superuser only)."""
    async with pool.acquire() as conn:
        await conn.execute("SET session_replication_role = replica")
        try:
            return await conn.execute(sql, *args)
        finally:
            await conn.execute("RESET session_replication_role")


async def three_journals(pool: asyncpg.Pool, tenant_id: uuid.UUID) -> list[Journal]:
    """A capture, a fee and a refund of one payment."""
    payment = uuid.uuid4()
    return [
        await post(
            pool, tenant_id, f"capture:{payment}", capture_postings("stripe", 1050, "EUR"), payment_id=payment
        ),
        await post(
            pool,
            tenant_id,
            f"fee:{payment}",
            fee_postings("stripe", 45, "EUR"),
            kind=JournalKind.FEE,
            payment_id=payment,
        ),
        await post(
            pool,
            tenant_id,
            "refund:re_1",
            refund_postings("stripe", 300, "EUR"),
            kind=JournalKind.REFUND,
            payment_id=payment,
            reference="re_1",
        ),
    ]


# --- posting ---------------------------------------------------------------------------------------


async def test_balanced_journal_is_stored_and_chained(pool: asyncpg.Pool, tenant: TenantCredentials) -> None:
    payment = uuid.uuid4()
    first = await post(
        pool,
        tenant.tenant_id,
        "capture:1",
        capture_postings("stripe", 1050, "EUR"),
        payment_id=payment,
        reference="pi_1",
    )
    second = await post(
        pool, tenant.tenant_id, "fee:1", fee_postings("stripe", 45, "EUR"), kind=JournalKind.FEE
    )

    assert (first.sequence, second.sequence) == (1, 2)
    assert first.prev_hash == GENESIS_HASH
    assert second.prev_hash == first.hash
    assert not first.replayed
    rows = await pool.fetch(
        """SELECT p.line_no, a.code, p.amount_minor, p.currency FROM ledger_postings p
           JOIN ledger_accounts a ON a.id = p.account_id WHERE p.journal_id = $1 ORDER BY p.line_no""",
        first.id,
    )
    assert [tuple(r) for r in rows] == [
        (1, "customer_receivable", 1050, "EUR"),
        (2, "merchant_balance", -1050, "EUR"),
        (3, "processor_clearing:stripe", 1050, "EUR"),
        (4, "customer_receivable", -1050, "EUR"),
    ]
    assert await find_journal(pool, tenant.tenant_id, "capture:1") == first
    assert await payment_journals(pool, tenant.tenant_id, payment) == [first]
    result = await verify_chain(pool, tenant.tenant_id)
    assert result.ok
    assert (result.tenants[0].journals, result.tenants[0].postings) == (2, 6)
    assert result.tenants[0].head_hash == second.hash


async def test_hash_chain_matches_the_documented_encoding(
    pool: asyncpg.Pool, tenant: TenantCredentials
) -> None:
    """An independent implementation of the module docstring's encoding reproduces every stored hash."""
    await three_journals(pool, tenant.tenant_id)
    await post(pool, tenant.tenant_id, "ünïcode-kéy", capture_postings("adyen", 7, "JPY"), reference="réf €")

    def s(text: str) -> bytes:
        data = text.encode("utf-8")
        return struct.pack(">I", len(data)) + data

    journals = await pool.fetch(
        """SELECT j.*, (extract(epoch FROM created_at) * 1000000)::bigint AS micros
             FROM ledger_journals j WHERE tenant_id = $1 ORDER BY seq""",
        tenant.tenant_id,
    )
    prev = bytes(32)
    for j in journals:
        lines = await pool.fetch(
            """SELECT p.line_no, a.code, p.currency, p.amount_minor FROM ledger_postings p
               JOIN ledger_accounts a ON a.id = p.account_id WHERE journal_id = $1 ORDER BY line_no""",
            j["id"],
        )
        body = struct.pack(">I", len(lines)) + b"".join(
            struct.pack(">I", r["line_no"])
            + s(r["code"])
            + r["currency"].encode()
            + struct.pack(">q", r["amount_minor"])
            for r in lines
        )
        header = (
            s("switchboard.ledger/1")
            + j["tenant_id"].bytes
            + struct.pack(">q", j["seq"])
            + j["id"].bytes
            + s(j["kind"])
            + (b"\x00" if j["payment_id"] is None else b"\x01" + j["payment_id"].bytes)
            + s(j["reference"])
            + s(j["idempotency_key"])
            + struct.pack(">q", j["micros"])
            + struct.pack(">I", len(lines))
        )
        expected = hashlib.sha256(prev + header + hashlib.sha256(body).digest()).digest()
        assert bytes(j["prev_hash"]) == prev
        assert bytes(j["hash"]) == expected
        prev = expected
    assert len(journals) == 4


@pytest.mark.parametrize(
    ("postings", "error"),
    [
        pytest.param(
            [Posting("refunds", 100, "EUR"), Posting("processor_clearing:stripe", -90, "EUR")],
            UnbalancedJournal,
            id="unbalanced",
        ),
        pytest.param(
            [Posting("refunds", 100, "EUR"), Posting("processor_clearing:stripe", -100, "USD")],
            UnbalancedJournal,
            id="balanced-total-but-not-per-currency",
        ),
        pytest.param([Posting("refunds", 100, "EUR")], InvalidPosting, id="one-posting"),
    ],
)
async def test_python_rejects_a_bad_journal_before_any_sql(
    pool: asyncpg.Pool, tenant: TenantCredentials, postings: list[Posting], error: type[Exception]
) -> None:
    async with pool.acquire() as conn:
        # Outside a transaction: the postings are refused before even that is checked.
        with pytest.raises(error) as raised:
            await post_journal(
                conn,
                tenant.tenant_id,
                kind="refund",
                payment_id=None,
                reference="",
                idempotency_key="k",
                postings=postings,
            )
    assert isinstance(raised.value, ValueError)
    assert await counts(pool) == (0, 0)


def test_unbalanced_error_names_each_currency() -> None:
    with pytest.raises(UnbalancedJournal, match=r"EUR \+10, USD -5") as raised:
        validate_postings(
            [
                Posting(FEES, 10, "EUR"),
                Posting(MERCHANT_BALANCE, -5, "USD"),
                Posting(FEES, 1, "GBP"),
                Posting(MERCHANT_BALANCE, -1, "GBP"),
            ]
        )
    assert raised.value.totals == {"EUR": 10, "USD": -5}


@pytest.mark.parametrize(
    ("account", "amount", "currency"),
    [
        ("bank", 1, "EUR"),
        ("processor_clearing:Stripe", 1, "EUR"),
        ("fees", 0, "EUR"),
        ("fees", 2**63, "EUR"),
        ("fees", 1.5, "EUR"),
        ("fees", True, "EUR"),
        ("fees", 1, "eur"),
        ("fees", 1, "EURO"),
    ],
)
def test_posting_rules(account: str, amount: Any, currency: str) -> None:
    with pytest.raises(InvalidPosting):
        Posting(account, amount, currency)


def test_builders_refuse_non_positive_amounts_and_bad_processors() -> None:
    with pytest.raises(InvalidPosting, match="> 0"):
        capture_postings("stripe", -5, "EUR")
    with pytest.raises(InvalidPosting, match="processor name"):
        refund_postings("Stripe Inc", 5, "EUR")
    assert sum(p.amount_minor for p in fee_postings("adyen", 5, "EUR")) == 0


async def test_post_journal_requires_the_callers_transaction(
    pool: asyncpg.Pool, tenant: TenantCredentials
) -> None:
    async with pool.acquire() as conn:
        with pytest.raises(NotInTransaction):
            await post_journal(
                conn,
                tenant.tenant_id,
                kind=JournalKind.FEE,
                payment_id=None,
                reference="",
                idempotency_key="fee:1",
                postings=fee_postings("stripe", 5, "EUR"),
            )
    assert await counts(pool) == (0, 0)


async def test_journal_rolls_back_with_the_callers_transaction(
    pool: asyncpg.Pool, tenant: TenantCredentials
) -> None:
    class PaymentUpdateFailed(Exception):
        pass

    posted: list[Journal] = []

    async def capture_then_fail() -> None:
        async with pool.acquire() as conn, conn.transaction():
            posted.append(
                await post_journal(
                    conn,
                    tenant.tenant_id,
                    kind=JournalKind.CAPTURE,
                    payment_id=None,
                    reference="",
                    idempotency_key="capture:1",
                    postings=capture_postings("stripe", 100, "EUR"),
                )
            )
            raise PaymentUpdateFailed

    with pytest.raises(PaymentUpdateFailed):
        await capture_then_fail()
    assert [j.sequence for j in posted] == [1]
    assert await counts(pool) == (0, 0)
    again = await post(pool, tenant.tenant_id, "capture:1", capture_postings("stripe", 100, "EUR"))
    assert again.sequence == 1
    assert not again.replayed


async def test_post_journal_works_with_immediate_constraints(
    pool: asyncpg.Pool, tenant: TenantCredentials
) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
        journal = await post_journal(
            conn,
            tenant.tenant_id,
            kind=JournalKind.CAPTURE,
            payment_id=None,
            reference="",
            idempotency_key="capture:1",
            postings=capture_postings("stripe", 100, "EUR"),
        )
    assert journal.sequence == 1
    assert await counts(pool) == (1, 4)


async def test_reposting_an_idempotency_key_returns_the_journal_and_posts_nothing(
    pool: asyncpg.Pool, tenant: TenantCredentials
) -> None:
    payment = uuid.uuid4()
    first = await post(
        pool,
        tenant.tenant_id,
        f"capture:{payment}",
        capture_postings("stripe", 500, "EUR"),
        payment_id=payment,
    )
    again = await post(
        pool,
        tenant.tenant_id,
        f"capture:{payment}",
        capture_postings("stripe", 500, "EUR"),
        payment_id=payment,
    )
    assert again.replayed
    assert again.id == first.id
    assert again.hash == first.hash
    assert again.sequence == 1
    assert await counts(pool) == (1, 4)

    with pytest.raises(IdempotencyConflict, match=f"capture:{payment}"):
        await post(
            pool,
            tenant.tenant_id,
            f"capture:{payment}",
            capture_postings("stripe", 501, "EUR"),
            payment_id=payment,
        )
    assert await counts(pool) == (1, 4)


# --- what the database enforces -------------------------------------------------------------------

INSERT_POSTING = """
    INSERT INTO ledger_postings (journal_id, tenant_id, line_no, account_id, amount_minor, currency)
    VALUES ($1, $2, $3, $4, $5, $6)"""


async def _fees_account(conn: Any, tenant_id: uuid.UUID) -> int:
    await conn.execute(
        """INSERT INTO ledger_accounts (tenant_id, code, kind) VALUES ($1, 'fees', 'expense')
           ON CONFLICT DO NOTHING""",
        tenant_id,
    )
    account_id: int = await conn.fetchval(
        "SELECT id FROM ledger_accounts WHERE tenant_id = $1 AND code = 'fees'", tenant_id
    )
    return account_id


async def _raw_journal(
    conn: Any, tenant_id: uuid.UUID, lines: list[tuple[int, str]], *, declared: int | None = None
) -> uuid.UUID:
    """Insert a journal and its postings with plain SQL: no Python checks (hashes are dummies)."""
    account_id = await _fees_account(conn, tenant_id)
    journal_id = uuid.uuid4()
    await conn.execute(
        """INSERT INTO ledger_journals (id, tenant_id, seq, kind, reference, idempotency_key, created_at,
                                        posting_count, postings_digest, prev_hash, hash)
           VALUES ($1, $2, 1, 'fee', '', $3, now(), $4, $5, $5, $5)""",
        journal_id,
        tenant_id,
        str(journal_id),
        len(lines) if declared is None else declared,
        bytes(32),
    )
    for line_no, (amount, currency) in enumerate(lines, start=1):
        await conn.execute(
            INSERT_POSTING,
            journal_id,
            tenant_id,
            line_no,
            account_id,
            amount,
            currency,
        )
    return journal_id


@pytest.mark.parametrize(
    ("lines", "declared", "message"),
    [
        pytest.param(
            [(100, "EUR"), (-90, "EUR")], None, "unbalanced: EUR postings sum to 10", id="unbalanced"
        ),
        pytest.param(
            [(100, "EUR"), (-100, "EUR"), (7, "USD"), (-6, "USD")],
            None,
            "USD postings sum to 1",
            id="one-currency-off",
        ),
        pytest.param([(100, "EUR"), (-100, "USD")], None, "unbalanced", id="balanced-across-currencies"),
        pytest.param([], 2, "has 0 postings but declares 2", id="no-postings"),
        pytest.param([(100, "EUR"), (-100, "EUR")], 3, "has 2 postings but declares 3", id="missing-posting"),
    ],
)
async def test_database_rejects_an_unbalanced_journal_at_commit(
    pool: asyncpg.Pool,
    tenant: TenantCredentials,
    lines: list[tuple[int, str]],
    declared: int | None,
    message: str,
) -> None:
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await _raw_journal(conn, tenant.tenant_id, lines, declared=declared)  # deferred: accepted so far
        with pytest.raises(asyncpg.CheckViolationError, match=message):
            await tx.commit()
        assert not conn.is_in_transaction()  # the failed COMMIT rolled everything back
    assert await counts(pool) == (0, 0)


async def test_database_accepts_a_balanced_raw_journal(pool: asyncpg.Pool, tenant: TenantCredentials) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await _raw_journal(conn, tenant.tenant_id, [(100, "EUR"), (-60, "EUR"), (-40, "EUR")])
    assert await counts(pool) == (1, 3)


async def test_postings_cannot_be_added_to_a_committed_journal(
    pool: asyncpg.Pool, tenant: TenantCredentials
) -> None:
    journal = await post(
        pool, tenant.tenant_id, "fee:1", fee_postings("stripe", 45, "EUR"), kind=JournalKind.FEE
    )
    async with pool.acquire() as conn:
        account_id = await _fees_account(conn, tenant.tenant_id)
        with pytest.raises(asyncpg.CheckViolationError, match="has 4 postings but declares 2"):
            async with conn.transaction():
                # A balanced pair: only the declared posting count can catch it.
                await conn.executemany(
                    INSERT_POSTING,
                    [
                        (journal.id, tenant.tenant_id, 3, account_id, 5, "EUR"),
                        (journal.id, tenant.tenant_id, 4, account_id, -5, "EUR"),
                    ],
                )
    assert await counts(pool) == (1, 2)


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE ledger_postings SET amount_minor = amount_minor * 2",
        "DELETE FROM ledger_postings",
        "UPDATE ledger_journals SET reference = 'changed'",
        "DELETE FROM ledger_journals",
        "UPDATE ledger_accounts SET code = 'fees' WHERE code = 'refunds'",
        "DELETE FROM ledger_accounts",
        "TRUNCATE ledger_postings",
        "TRUNCATE ledger_postings, ledger_journals, ledger_accounts",
    ],
)
async def test_update_delete_and_truncate_are_refused(
    pool: asyncpg.Pool, tenant: TenantCredentials, sql: str
) -> None:
    await three_journals(pool, tenant.tenant_id)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="the ledger is append-only"):
        await pool.execute(sql)
    assert await counts(pool) == (3, 8)
    assert (await verify_chain(pool)).ok


async def test_database_checks_currency_and_amount(pool: asyncpg.Pool, tenant: TenantCredentials) -> None:
    for lines, error in [
        ([(100, "eur"), (-100, "eur")], asyncpg.CheckViolationError),
        ([(0, "EUR"), (0, "EUR")], asyncpg.CheckViolationError),
        ([(2**63 - 1, "EUR"), (1, "EUR")], asyncpg.CheckViolationError),  # sums are numeric: no overflow
    ]:
        with pytest.raises(error):
            async with pool.acquire() as conn, conn.transaction():
                await _raw_journal(conn, tenant.tenant_id, lines)
    assert await counts(pool) == (0, 0)


# --- concurrency -----------------------------------------------------------------------------------


async def test_concurrent_posting_gives_a_gapless_valid_chain(
    pool: asyncpg.Pool, tenant: TenantCredentials
) -> None:
    keys = [f"capture:{n % 40}" for n in range(60)]  # 20 keys delivered twice, concurrently

    async def one(key: str) -> Journal:
        amount = 100 + int(key.split(":")[1])
        return await post(pool, tenant.tenant_id, key, capture_postings("stripe", amount, "EUR"))

    journals = await asyncio.gather(*(one(key) for key in keys))

    assert sum(j.replayed for j in journals) == 20
    fresh = [j for j in journals if not j.replayed]
    assert sorted(j.sequence for j in fresh) == list(range(1, 41))
    assert {j.id for j in journals} == {j.id for j in fresh}
    sequences = await pool.fetch(
        "SELECT seq FROM ledger_journals WHERE tenant_id = $1 ORDER BY seq", tenant.tenant_id
    )
    assert [r["seq"] for r in sequences] == list(range(1, 41))
    result = await verify_chain(pool, tenant.tenant_id)
    assert result.ok
    assert result.tenants[0].head_sequence == 40
    assert result.tenants[0].postings == 160


# --- verification ----------------------------------------------------------------------------------


async def test_verify_passes_on_a_good_chain_and_an_empty_one(
    pool: asyncpg.Pool, tenant: TenantCredentials, other_tenant: TenantCredentials
) -> None:
    journals = await three_journals(pool, tenant.tenant_id)
    result = await verify_chain(pool)
    assert result.ok
    assert result.broken == []
    by_name = {chain.tenant_name: chain for chain in result.tenants}
    assert (by_name["acme"].journals, by_name["acme"].postings, by_name["acme"].head_sequence) == (3, 8, 3)
    assert by_name["acme"].head_hash == journals[-1].hash
    assert (by_name["globex"].journals, by_name["globex"].head_hash) == (0, GENESIS_HASH)


async def test_verify_reads_inside_the_callers_transaction(
    pool: asyncpg.Pool, tenant: TenantCredentials
) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await post_journal(
            conn,
            tenant.tenant_id,
            kind=JournalKind.FEE,
            payment_id=None,
            reference="",
            idempotency_key="fee:1",
            postings=fee_postings("stripe", 5, "EUR"),
        )
        inside = await verify_chain(conn, tenant.tenant_id)
    assert inside.ok
    assert inside.tenants[0].journals == 1


async def test_verify_of_an_unknown_tenant_raises(pool: asyncpg.Pool) -> None:
    with pytest.raises(LookupError):
        await verify_chain(pool, uuid.uuid4())


@pytest.mark.parametrize(
    ("sql", "reasons"),
    [
        pytest.param(
            "UPDATE ledger_postings SET amount_minor = amount_minor + 1 "
            "WHERE journal_id = $1 AND line_no = 2",
            (BreakReason.POSTING_ALTERED, BreakReason.UNBALANCED),
            id="posting-amount",
        ),
        pytest.param(
            "UPDATE ledger_postings SET amount_minor = -amount_minor WHERE journal_id = $1",
            (BreakReason.POSTING_ALTERED,),
            id="postings-sides-swapped-still-balanced",
        ),
        pytest.param(
            "UPDATE ledger_postings SET currency = 'USD' WHERE journal_id = $1",
            (BreakReason.POSTING_ALTERED,),
            id="posting-currency",
        ),
        pytest.param(
            """UPDATE ledger_postings p SET account_id = (SELECT id FROM ledger_accounts a
                   WHERE a.tenant_id = p.tenant_id AND a.code = 'merchant_balance')
                WHERE journal_id = $1 AND line_no = 1""",
            (BreakReason.POSTING_ALTERED,),
            id="posting-account",
        ),
        pytest.param(
            "UPDATE ledger_accounts SET code = 'processor_clearing:adyen', kind = 'asset' "
            "WHERE code = 'fees'",
            (BreakReason.POSTING_ALTERED,),
            id="account-renamed",
        ),
        pytest.param(
            "DELETE FROM ledger_postings WHERE journal_id = $1 AND line_no = 2",
            (BreakReason.POSTING_ALTERED, BreakReason.UNBALANCED),
            id="posting-deleted",
        ),
        pytest.param(
            "UPDATE ledger_journals SET reference = 'pi_other' WHERE id = $1",
            (BreakReason.JOURNAL_ALTERED,),
            id="journal-reference",
        ),
        pytest.param(
            "UPDATE ledger_journals SET created_at = created_at + interval '1 microsecond' WHERE id = $1",
            (BreakReason.JOURNAL_ALTERED,),
            id="journal-created-at",
        ),
        pytest.param(
            "UPDATE ledger_journals SET payment_id = NULL WHERE id = $1",
            (BreakReason.JOURNAL_ALTERED,),
            id="journal-payment",
        ),
        pytest.param(
            "UPDATE ledger_journals SET kind = 'refund' WHERE id = $1",
            (BreakReason.JOURNAL_ALTERED,),
            id="journal-kind",
        ),
        pytest.param(
            "UPDATE ledger_journals SET prev_hash = hash WHERE id = $1",
            (BreakReason.CHAIN_BROKEN, BreakReason.JOURNAL_ALTERED),
            id="journal-prev-hash",
        ),
    ],
)
async def test_verify_names_the_journal_altered_in_the_database(
    pool: asyncpg.Pool, tenant: TenantCredentials, sql: str, reasons: tuple[BreakReason, ...]
) -> None:
    journals = await three_journals(pool, tenant.tenant_id)
    target = journals[1]  # the fee journal, sequence 2
    status = await tamper(pool, sql, target.id) if "$1" in sql else await tamper(pool, sql)
    assert status.split()[-1] != "0"

    result = await verify_chain(pool, tenant.tenant_id)
    assert not result.ok
    chain = result.tenants[0]
    broken = chain.broken
    assert broken is not None
    assert (broken.tenant_id, broken.sequence, broken.expected_sequence) == (tenant.tenant_id, 2, 2)
    assert broken.journal_id == target.id
    assert broken.reasons == reasons
    assert broken.reason == reasons[0]
    assert broken.stored_hash == target.hash
    # Only a rewritten prev_hash leaves the journal's contents, so their hash, as they were.
    assert (broken.expected_hash == target.hash) == (BreakReason.CHAIN_BROKEN in reasons)
    assert broken.expected_prev_hash == journals[0].hash
    # Verification stops at the first break; the last good link is the one before.
    assert (chain.head_sequence, chain.head_hash, chain.journals) == (1, journals[0].hash, 2)


async def test_verify_reports_a_missing_sequence(pool: asyncpg.Pool, tenant: TenantCredentials) -> None:
    journals = await three_journals(pool, tenant.tenant_id)
    await tamper(pool, "DELETE FROM ledger_postings WHERE journal_id = $1", journals[1].id)
    await tamper(pool, "DELETE FROM ledger_journals WHERE id = $1", journals[1].id)

    broken = (await verify_chain(pool, tenant.tenant_id)).broken
    assert len(broken) == 1
    assert broken[0].journal_id == journals[2].id
    assert (broken[0].sequence, broken[0].expected_sequence) == (3, 2)
    assert broken[0].reasons == (BreakReason.MISSING_SEQUENCE, BreakReason.CHAIN_BROKEN)
    assert "sequence 2 is missing" in broken[0].detail


async def test_a_journal_rewritten_with_a_recomputed_hash_breaks_the_next_link(
    pool: asyncpg.Pool, tenant: TenantCredentials
) -> None:
    journals = await three_journals(pool, tenant.tenant_id)
    first = journals[0]
    header = encode_header(
        tenant_id=first.tenant_id,
        sequence=1,
        journal_id=first.id,
        kind=first.kind,
        payment_id=first.payment_id,
        reference="forged",
        idempotency_key=first.idempotency_key,
        created_at=first.created_at,
        posting_count=len(first.postings),
    )
    forged = chain_hash(GENESIS_HASH, header, first.postings_digest)
    await tamper(
        pool, "UPDATE ledger_journals SET reference = 'forged', hash = $2 WHERE id = $1", first.id, forged
    )

    broken = (await verify_chain(pool, tenant.tenant_id)).broken
    assert [(b.sequence, b.journal_id, b.reasons) for b in broken] == [
        (2, journals[1].id, (BreakReason.CHAIN_BROKEN,))
    ]
    assert broken[0].stored_prev_hash == first.hash
    assert broken[0].expected_prev_hash == forged


# --- balances and tenants --------------------------------------------------------------------------


async def test_balances_per_account_and_currency(pool: asyncpg.Pool, tenant: TenantCredentials) -> None:
    await post(pool, tenant.tenant_id, "capture:1", capture_postings("stripe", 1050, "EUR"))
    await post(pool, tenant.tenant_id, "capture:2", capture_postings("adyen", 2000, "USD"))
    await post(
        pool, tenant.tenant_id, "refund:1", refund_postings("stripe", 300, "EUR"), kind=JournalKind.REFUND
    )
    await post(pool, tenant.tenant_id, "fee:1", fee_postings("stripe", 45, "EUR"), kind=JournalKind.FEE)
    # One journal may carry several currencies when each balances on its own.
    await post(
        pool,
        tenant.tenant_id,
        "fee:2",
        fee_postings("adyen", 60, "USD") + fee_postings("stripe", 5, "EUR"),
        kind=JournalKind.FEE,
    )

    balances = {(b.account, b.currency): b for b in await account_balances(pool, tenant.tenant_id)}
    assert {key: b.balance_minor for key, b in balances.items()} == {
        ("customer_receivable", "EUR"): 0,
        ("customer_receivable", "USD"): 0,
        ("fees", "EUR"): 50,
        ("fees", "USD"): 60,
        ("merchant_balance", "EUR"): -1050,
        ("merchant_balance", "USD"): -2000,
        ("processor_clearing:adyen", "USD"): 2000 - 60,
        ("processor_clearing:stripe", "EUR"): 1050 - 300 - 50,
        ("refunds", "EUR"): 300,
    }
    receivable = balances[("customer_receivable", "EUR")]
    assert (receivable.debits_minor, receivable.credits_minor, receivable.postings) == (1050, 1050, 2)
    assert balances[("merchant_balance", "EUR")].kind is AccountKind.LIABILITY
    assert balances[("refunds", "EUR")].kind.normal_side == "debit"
    for currency in ("EUR", "USD"):
        assert sum(b.balance_minor for (_, c), b in balances.items() if c == currency) == 0


async def test_tenants_have_independent_chains(
    pool: asyncpg.Pool, tenant: TenantCredentials, other_tenant: TenantCredentials
) -> None:
    ours: list[Journal] = []
    theirs: list[Journal] = []
    for n in range(3):
        # The same idempotency keys in both tenants: each tenant has its own key space.
        ours.append(
            await post(pool, tenant.tenant_id, f"capture:{n}", capture_postings("stripe", 100 + n, "EUR"))
        )
        theirs.append(
            await post(pool, other_tenant.tenant_id, f"capture:{n}", capture_postings("adyen", 7, "GBP"))
        )
    assert [j.sequence for j in ours] == [j.sequence for j in theirs] == [1, 2, 3]
    assert ours[0].prev_hash == theirs[0].prev_hash == GENESIS_HASH
    assert not any(j.replayed for j in theirs)

    await tamper(
        pool, "UPDATE ledger_postings SET amount_minor = 1 WHERE journal_id = $1 AND line_no = 1", ours[2].id
    )
    result = await verify_chain(pool)
    by_id = {chain.tenant_id: chain for chain in result.tenants}
    assert not result.ok
    assert [b.journal_id for b in result.broken] == [ours[2].id]
    assert by_id[other_tenant.tenant_id].ok
    assert by_id[other_tenant.tenant_id].journals == 3
    assert (await verify_chain(pool, other_tenant.tenant_id)).ok
    assert {b.tenant_id for b in await account_balances(pool, other_tenant.tenant_id)} == {
        other_tenant.tenant_id
    }
    assert await find_journal(pool, other_tenant.tenant_id, "capture:0") == theirs[0]


# --- the command line ------------------------------------------------------------------------------


async def ledger_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m switchboard.ledger_cli`` against this test's database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update(SWITCHBOARD_DATABASE_URL=database_url, COLUMNS="250")
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "switchboard.ledger_cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_cli_verify_and_balance(
    pool: asyncpg.Pool, database_url: str, tenant: TenantCredentials, other_tenant: TenantCredentials
) -> None:
    journals = await three_journals(pool, tenant.tenant_id)
    await post(pool, other_tenant.tenant_id, "capture:1", capture_postings("adyen", 2000, "USD"))

    ok = await ledger_cli(database_url, "verify")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"OK acme ({tenant.tenant_id}): 3 journal(s), 8 posting(s), head sequence 3" in ok.stdout
    assert journals[-1].hash.hex() in ok.stdout
    assert "ledger OK: 2 tenant(s), 4 journal(s) verified" in ok.stdout

    balance = await ledger_cli(database_url, "balance", "--tenant", "acme")
    assert balance.returncode == 0, balance.stderr
    assert "processor_clearing:stripe" in balance.stdout
    assert "705 Dr" in balance.stdout  # 1050 - 300 - 45
    assert "1050 Cr" in balance.stdout
    assert "trial balance: EUR 0" in balance.stdout
    assert "globex" not in balance.stdout
    everyone = await ledger_cli(database_url, "balance")
    assert "2000 Cr" in everyone.stdout
    assert "trial balance: USD 0" in everyone.stdout

    await tamper(pool, "UPDATE ledger_journals SET reference = 'x' WHERE id = $1", journals[1].id)
    broken = await ledger_cli(database_url, "verify")
    assert broken.returncode == 1
    assert (
        f"BROKEN acme ({tenant.tenant_id}): first broken link at sequence 2, journal {journals[1].id}"
        in broken.stdout
    )
    assert "journal_altered" in broken.stdout
    assert f"stored hash   {journals[1].hash.hex()}" in broken.stdout
    assert f"OK globex ({other_tenant.tenant_id})" in broken.stdout
    assert "ledger BROKEN: 1 of 2 tenant chain(s)" in broken.stdout

    by_id = await ledger_cli(database_url, "verify", "--tenant", str(other_tenant.tenant_id))
    assert by_id.returncode == 0
    assert "acme" not in by_id.stdout

    unknown = await ledger_cli(database_url, "verify", "--tenant", "nobody")
    assert unknown.returncode == 2
    assert "no tenant 'nobody'" in unknown.stdout


# --- many journals at once --------------------------------------------------------------------------


async def test_post_journals_appends_a_batch_to_the_chain_with_replays_and_conflicts(
    pool: asyncpg.Pool, tenant: TenantCredentials
) -> None:
    fee_a = fee_postings("stripe", 10, "EUR")
    first = await post(pool, tenant.tenant_id, "fee:a", fee_a, kind=JournalKind.FEE)
    requests = [
        JournalRequest(JournalKind.FEE, None, "b", "fee:b", fee_postings("stripe", 20, "EUR")),
        JournalRequest(JournalKind.FEE, None, "", "fee:a", fee_postings("stripe", 10, "EUR")),  # the same
        JournalRequest(JournalKind.FEE, None, "", "fee:a2", fee_postings("stripe", 30, "USD")),
        JournalRequest(JournalKind.FEE, None, "", "fee:a", fee_postings("stripe", 99, "EUR")),  # not the same
    ]
    with pytest.raises(InvalidPosting, match="appears twice"):
        async with pool.acquire() as conn, conn.transaction():
            await post_journals(conn, tenant.tenant_id, requests)
    del requests[3]
    async with pool.acquire() as conn, conn.transaction():
        results = await post_journals(conn, tenant.tenant_id, requests)
        conflict = await post_journals(
            conn,
            tenant.tenant_id,
            [JournalRequest(JournalKind.FEE, None, "", "fee:a", fee_postings("stripe", 99, "EUR"))],
        )
    b, a, a2 = results
    assert isinstance(b, Journal)
    assert isinstance(a, Journal)
    assert isinstance(a2, Journal)
    assert (b.sequence, a2.sequence) == (2, 3)  # new journals in request order, after the head
    assert (a.replayed, a.id) == (True, first.id)
    assert b.prev_hash == first.hash
    assert a2.prev_hash == b.hash
    assert isinstance(conflict[0], IdempotencyConflict)
    assert (await verify_chain(pool, tenant.tenant_id)).ok
    stored = await find_journal(pool, tenant.tenant_id, "fee:a2")
    assert stored is not None
    assert (stored.postings, stored.hash) == (a2.postings, a2.hash)
    async with pool.acquire() as conn, conn.transaction():
        assert await post_journals(conn, tenant.tenant_id, []) == []
