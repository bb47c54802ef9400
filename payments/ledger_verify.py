"""Recompute each tenant's ledger hash chain and name the first broken link.

The chain and its canonical encoding are specified in :mod:`payments.ledger`;
this module only reads. It walks a tenant's journals in ``seq`` order inside
one REPEATABLE READ, READ ONLY transaction (a consistent snapshot, so it can
run while payments are posting) and, for each journal, checks:

1. ``seq`` is the previous one + 1 (the first is 1), else ``missing_sequence``;
2. ``prev_hash`` is the previous journal's hash (genesis: 32 zero bytes),
   else ``chain_broken`` (the previous journal was rewritten together with its
   hash, a journal is missing, or ``prev_hash`` itself was changed);
3. ``SHA-256(prev_hash || header || postings_digest)`` over the stored row
   (its own ``prev_hash`` and ``postings_digest``) equals the stored ``hash``,
   else ``journal_altered``;
4. the digest recomputed from the stored postings equals the stored
   ``postings_digest`` (and every posting and its account belong to the
   journal's tenant), else ``posting_altered``;
5. the postings sum to 0 per currency, else ``unbalanced``.

It stops at the first journal failing any check and reports every reason that
applies to it. What a chain cannot show by itself is the loss of its newest
journals: compare the reported head (sequence and hash) with one recorded
elsewhere earlier (anchoring) to detect that.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import asyncpg

from payments.ledger import (
    GENESIS_HASH,
    chain_hash,
    encode_header,
    postings_digest,
    unbalanced_totals,
)
from switchboard.db.pool import Connection


class BreakReason(enum.StrEnum):
    """Why a journal breaks its tenant's chain."""

    MISSING_SEQUENCE = "missing_sequence"
    CHAIN_BROKEN = "chain_broken"
    JOURNAL_ALTERED = "journal_altered"
    POSTING_ALTERED = "posting_altered"
    UNBALANCED = "unbalanced"


@dataclass(frozen=True)
class BrokenLink:
    """The first journal of a tenant's chain that fails verification.

    ``sequence`` is the journal's stored ``seq``, ``expected_sequence`` the one
    the chain needed there. ``expected_hash`` is the hash the journal would
    have over its current contents, linked to the previous journal;
    ``stored_hash`` the one in the row (likewise for ``*_prev_hash``). All
    hashes are 32 bytes. ``reasons`` lists every failed check in the order of
    :class:`BreakReason`; ``detail`` explains them in words.
    """

    tenant_id: uuid.UUID
    sequence: int
    expected_sequence: int
    journal_id: uuid.UUID
    reasons: tuple[BreakReason, ...]
    expected_hash: bytes
    stored_hash: bytes
    expected_prev_hash: bytes
    stored_prev_hash: bytes
    detail: str

    @property
    def reason(self) -> BreakReason:
        """The first (most fundamental) reason."""
        return self.reasons[0]


@dataclass(frozen=True)
class TenantChain:
    """The verification of one tenant's chain.

    ``journals`` and ``postings`` count what was checked (up to and including
    the broken journal); ``head_sequence`` / ``head_hash`` are the last
    journal that verified (0 and 32 zero bytes for an empty chain).
    """

    tenant_id: uuid.UUID
    tenant_name: str
    journals: int
    postings: int
    head_sequence: int
    head_hash: bytes
    broken: BrokenLink | None = None

    @property
    def ok(self) -> bool:
        """True when every journal verified."""
        return self.broken is None


@dataclass(frozen=True)
class VerifyResult:
    """The verification of every requested tenant's chain, ordered by tenant name."""

    tenants: tuple[TenantChain, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """True when every tenant's chain verified."""
        return all(chain.ok for chain in self.tenants)

    @property
    def broken(self) -> list[BrokenLink]:
        """The first broken link of each broken chain."""
        return [chain.broken for chain in self.tenants if chain.broken is not None]


_CHAIN_ROWS = """
    SELECT j.id, j.tenant_id, j.seq, j.kind, j.payment_id, j.reference, j.idempotency_key, j.created_at,
           j.posting_count, j.postings_digest, j.prev_hash, j.hash,
           p.line_no, p.tenant_id AS posting_tenant, p.amount_minor, p.currency,
           a.code, a.tenant_id AS account_tenant
      FROM ledger_journals j
      LEFT JOIN ledger_postings p ON p.journal_id = j.id
      LEFT JOIN ledger_accounts a ON a.id = p.account_id
     WHERE j.tenant_id = $1
     ORDER BY j.seq, p.line_no
"""


async def _journals(conn: Connection, tenant_id: uuid.UUID) -> AsyncIterator[list[asyncpg.Record]]:
    """Yield each journal of the tenant as its rows (one per posting), in chain order."""
    group: list[asyncpg.Record] = []
    async for row in conn.cursor(_CHAIN_ROWS, tenant_id, prefetch=1000):
        if group and group[0]["id"] != row["id"]:
            yield group
            group = []
        group.append(row)
    if group:
        yield group


def _check_journal(
    rows: Sequence[asyncpg.Record], expected_sequence: int, expected_prev: bytes
) -> BrokenLink | None:
    """Check one journal (its rows from ``_CHAIN_ROWS``) against the chain so far."""
    journal = rows[0]
    tenant_id: uuid.UUID = journal["tenant_id"]
    postings = [row for row in rows if row["line_no"] is not None]
    stored_prev = bytes(journal["prev_hash"])
    stored_hash = bytes(journal["hash"])
    stored_digest = bytes(journal["postings_digest"])
    header = encode_header(
        tenant_id=tenant_id,
        sequence=journal["seq"],
        journal_id=journal["id"],
        kind=journal["kind"],
        payment_id=journal["payment_id"],
        reference=journal["reference"],
        idempotency_key=journal["idempotency_key"],
        created_at=journal["created_at"],
        posting_count=journal["posting_count"],
    )
    foreign = [
        row["line_no"]
        for row in postings
        if row["posting_tenant"] != tenant_id or row["account_tenant"] != tenant_id or row["code"] is None
    ]
    digest = postings_digest(
        [(row["line_no"], row["code"] or "", row["currency"], row["amount_minor"]) for row in postings]
    )
    totals = unbalanced_totals((row["currency"], row["amount_minor"]) for row in postings)

    reasons: list[BreakReason] = []
    details: list[str] = []
    if journal["seq"] != expected_sequence:
        reasons.append(BreakReason.MISSING_SEQUENCE)
        missing = (
            f"{expected_sequence}"
            if journal["seq"] == expected_sequence + 1
            else f"{expected_sequence}..{journal['seq'] - 1}"
        )
        details.append(f"sequence {missing} is missing before sequence {journal['seq']}")
    if stored_prev != expected_prev:
        reasons.append(BreakReason.CHAIN_BROKEN)
        details.append(
            f"prev_hash {stored_prev.hex()} is not the previous journal's hash {expected_prev.hex()}"
        )
    if chain_hash(stored_prev, header, stored_digest) != stored_hash:
        reasons.append(BreakReason.JOURNAL_ALTERED)
        details.append("the journal row does not match its hash")
    if digest != stored_digest or foreign:
        reasons.append(BreakReason.POSTING_ALTERED)
        if foreign:
            details.append(f"postings {foreign} belong to another tenant or to no account")
        else:
            details.append(
                f"the {len(postings)} posting(s) do not match the journal's postings digest "
                f"(recomputed {digest.hex()}, stored {stored_digest.hex()})"
            )
    if totals or not postings:
        reasons.append(BreakReason.UNBALANCED)
        shown = ", ".join(f"{currency} {total:+d}" for currency, total in sorted(totals.items()))
        details.append(f"postings sum to {shown}, not 0" if totals else "the journal has no postings")
    if not reasons:
        return None
    return BrokenLink(
        tenant_id=tenant_id,
        sequence=journal["seq"],
        expected_sequence=expected_sequence,
        journal_id=journal["id"],
        reasons=tuple(reasons),
        expected_hash=chain_hash(expected_prev, header, digest),
        stored_hash=stored_hash,
        expected_prev_hash=expected_prev,
        stored_prev_hash=stored_prev,
        detail="; ".join(details),
    )


async def verify_tenant_chain(conn: Connection, tenant_id: uuid.UUID, tenant_name: str = "") -> TenantChain:
    """Verify one tenant's chain on ``conn`` (which should hold a consistent snapshot).

    Stops at the first broken journal. See :func:`verify_chain`.
    """
    expected_sequence = 1
    prev = GENESIS_HASH
    journals = postings = 0
    async for rows in _journals(conn, tenant_id):
        journals += 1
        postings += sum(1 for row in rows if row["line_no"] is not None)
        broken = _check_journal(rows, expected_sequence, prev)
        if broken is not None:
            return TenantChain(
                tenant_id, tenant_name, journals, postings, expected_sequence - 1, prev, broken
            )
        prev = bytes(rows[0]["hash"])
        expected_sequence += 1
    return TenantChain(tenant_id, tenant_name, journals, postings, expected_sequence - 1, prev)


async def _verify(conn: Connection, tenant_id: uuid.UUID | None) -> VerifyResult:
    if tenant_id is None:
        tenants = await conn.fetch("SELECT id, name FROM tenants ORDER BY name, id")
    else:
        tenants = await conn.fetch("SELECT id, name FROM tenants WHERE id = $1", tenant_id)
        if not tenants:
            raise LookupError(f"no tenant {tenant_id}")
    return VerifyResult(tuple([await verify_tenant_chain(conn, row["id"], row["name"]) for row in tenants]))


async def verify_chain(
    conn_or_pool: Connection | asyncpg.Pool, tenant_id: uuid.UUID | None = None
) -> VerifyResult:
    """Recompute the hash chain of tenant ``tenant_id`` (every tenant when None).

    With a pool or a connection outside a transaction, reads in a
    REPEATABLE READ, READ ONLY transaction of its own; with a connection
    already in a transaction, reads in that one. Returns a
    :class:`VerifyResult` with one :class:`TenantChain` per tenant (tenants
    without journals verify as empty chains). Raises ``LookupError`` for an
    unknown ``tenant_id``.
    """
    if isinstance(conn_or_pool, asyncpg.Pool):
        async with conn_or_pool.acquire() as acquired:
            return await verify_chain(acquired, tenant_id)
    conn = conn_or_pool
    if conn.is_in_transaction():
        return await _verify(conn, tenant_id)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await _verify(conn, tenant_id)
