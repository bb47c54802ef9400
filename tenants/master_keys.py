"""Master keys against the database: the start-up check and key rotation.

``master_key_canaries`` holds, per master key id, a fixed known plaintext
sealed under that key. At start every process runs ``verify_master_keys``: a
key whose canary does not open is not the key that wrote the data under that
id (a wrong ``SWITCHBOARD_MASTER_KEY``), and a key id used by a sealed table
(``provider_configs``: notification provider secrets; ``processor_configs``:
payment processor secrets) but absent from the ring would make those secrets
unreadable. Both stop the process with a ``MasterKeyError`` before it serves.

Rotation, with no downtime:

1. Put the new key in the ring of every process AFTER the current one
   (``old:...,new:...``) and restart them: everything can open both.
2. Make it the first entry everywhere (``new:...,old:...``) and restart:
   new secrets are sealed under the new key.
3. Run ``rotate_master_key``: it re-encrypts, in small transactions, every
   row of every sealed table still sealed under another key.
4. Remove the old key from the ring.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import structlog

from switchboard.db.pool import Connection
from tenants.sealing import (
    MASTER_KEY_ENV,
    MasterKeyError,
    MasterKeyRing,
    SealedSecret,
    SecretUnreadable,
    processor_secrets_associated_data,
    secrets_associated_data,
)

log = structlog.get_logger(__name__)

#: The known plaintext of every canary.
CANARY_PLAINTEXT = b"switchboard master key canary plaintext v1"
#: The associated data every canary is sealed with.
CANARY_ASSOCIATED_DATA = b"switchboard master key canary"
#: How long a rotation waits for rows locked by other transactions before giving up.
LOCKED_ROWS_WAIT_S = 30.0
_LOCKED_ROWS_POLL_S = 0.1


@dataclass(frozen=True)
class SealedTable:
    """A table of sealed secrets: every row has ``tenant_id``, a context column and ``key_id``,
    ``nonce``, ``ciphertext``; the associated data is ``associated_data(tenant_id, <context>)``.
    ``what`` names a row in error messages (e.g. "provider config")."""

    table: str
    context_column: str
    associated_data: Callable[[uuid.UUID, str], bytes]
    what: str


#: Every table holding sealed secrets, in the order a rotation re-encrypts them.
SEALED_TABLES: tuple[SealedTable, ...] = (
    SealedTable("provider_configs", "channel", secrets_associated_data, "provider config"),
    SealedTable("processor_configs", "processor", processor_secrets_associated_data, "processor config"),
)
# Table and column names below come only from SEALED_TABLES (constants); every value is a bind parameter.
_ALL_KEY_IDS = " UNION ALL ".join(f"SELECT key_id FROM {t.table}" for t in SEALED_TABLES)  # noqa: S608


async def _check_canaries(conn: Connection, ring: MasterKeyRing, key_ids: list[str]) -> None:
    rows = await conn.fetch(
        "SELECT key_id, nonce, ciphertext FROM master_key_canaries WHERE key_id = ANY($1::text[]) ORDER BY 1",
        key_ids,
    )
    mismatched: list[str] = []
    for row in rows:
        sealed = SealedSecret(key_id=row["key_id"], nonce=row["nonce"], ciphertext=row["ciphertext"])
        try:
            plaintext = ring.open(sealed, CANARY_ASSOCIATED_DATA)
        except SecretUnreadable:
            mismatched.append(sealed.key_id)
            continue
        if plaintext != CANARY_PLAINTEXT:
            mismatched.append(sealed.key_id)
    if mismatched:
        ids = ", ".join(repr(key_id) for key_id in mismatched)
        raise MasterKeyError(
            f"master key id(s) {ids} in {MASTER_KEY_ENV} do not match the key that wrote data under "
            f"that id (wrong {MASTER_KEY_ENV}?): the key's canary does not open. Use the key these "
            "ids had when the data was written; a new key needs a new id"
        )


async def _check_uncanaried_rows(conn: Connection, ring: MasterKeyRing) -> None:
    for sealed_table in SEALED_TABLES:
        rows = await conn.fetch(
            f"""SELECT DISTINCT ON (p.key_id) p.key_id, p.tenant_id,
                       p.{sealed_table.context_column} AS context, p.nonce, p.ciphertext
                  FROM {sealed_table.table} p
                 WHERE p.key_id = ANY($1::text[])
                   AND NOT EXISTS (SELECT 1 FROM master_key_canaries c WHERE c.key_id = p.key_id)
                 ORDER BY p.key_id""",  # noqa: S608
            list(ring.key_ids),
        )
        for row in rows:
            sealed = SealedSecret(key_id=row["key_id"], nonce=row["nonce"], ciphertext=row["ciphertext"])
            try:
                ring.open(sealed, sealed_table.associated_data(row["tenant_id"], row["context"]))
            except SecretUnreadable:
                raise MasterKeyError(
                    f"master key id {sealed.key_id!r} in {MASTER_KEY_ENV} does not match the key that sealed "
                    f"stored {sealed_table.what} secrets under that id (wrong {MASTER_KEY_ENV}?)"
                ) from None


async def verify_master_keys(conn: Connection, ring: MasterKeyRing) -> None:
    """Check ``ring`` against the database at start; write the current key's canary.

    1. Every ``key_id`` used by rows of ``provider_configs`` or
       ``processor_configs`` (``SEALED_TABLES``) must be in the ring, else
       ``MasterKeyError`` listing the missing ids (and their row counts, both
       tables together).
    2. Every canary in ``master_key_canaries`` whose key id is in the ring
       must open to the known plaintext, else ``MasterKeyError`` naming those
       ids: the ring holds a different key under that id.
    3. If the current key has no canary yet, one is written
       (``INSERT ... ON CONFLICT DO NOTHING``, safe for processes starting
       together) and checked again, so a concurrent start with another key
       under the same id is caught as well.

    2b. A key id of the ring with sealed rows but no canary (data written
       before any canary) is checked by opening one of its rows; the
       plaintext is discarded at once.

    Raises asyncpg's errors if the database fails.
    """
    missing = await conn.fetch(
        f"""SELECT key_id, count(*) AS rows FROM ({_ALL_KEY_IDS}) sealed
             WHERE NOT (key_id = ANY($1::text[]))
             GROUP BY key_id ORDER BY key_id""",  # noqa: S608
        list(ring.key_ids),
    )
    if missing:
        listed = ", ".join(
            f"{row['key_id']!r} ({row['rows']} row{'' if row['rows'] == 1 else 's'})" for row in missing
        )
        raise MasterKeyError(
            f"provider or processor configurations are sealed under master key id(s) missing from "
            f"{MASTER_KEY_ENV}: "
            f"{listed}. Add those keys back as non-first entries (it holds {', '.join(ring.key_ids)}) "
            "and run the master key rotation before removing them"
        )
    await _check_canaries(conn, ring, list(ring.key_ids))
    await _check_uncanaried_rows(conn, ring)
    canary = ring.seal(CANARY_PLAINTEXT, CANARY_ASSOCIATED_DATA)
    status = await conn.execute(
        """INSERT INTO master_key_canaries (key_id, nonce, ciphertext) VALUES ($1, $2, $3)
           ON CONFLICT (key_id) DO NOTHING""",
        canary.key_id,
        canary.nonce,
        canary.ciphertext,
    )
    if status == "INSERT 0 1":
        log.info("master key canary written", key_id=canary.key_id)
    else:
        await _check_canaries(conn, ring, [ring.current_key_id])
    log.info("master keys verified", current_key_id=ring.current_key_id, key_ids=list(ring.key_ids))


async def _reseal_rows(conn: Connection, ring: MasterKeyRing, sealed_table: SealedTable, limit: int) -> int:
    """Re-encrypt up to ``limit`` rows of ``sealed_table`` (inside the caller's transaction)."""
    column = sealed_table.context_column
    rows = await conn.fetch(
        f"""SELECT tenant_id, {column} AS context, key_id, nonce, ciphertext FROM {sealed_table.table}
             WHERE key_id <> $1
             ORDER BY tenant_id, {column}
             LIMIT $2
             FOR UPDATE SKIP LOCKED""",  # noqa: S608
        ring.current_key_id,
        limit,
    )
    for row in rows:
        associated_data = sealed_table.associated_data(row["tenant_id"], row["context"])
        old = SealedSecret(key_id=row["key_id"], nonce=row["nonce"], ciphertext=row["ciphertext"])
        try:
            plaintext = ring.open(old, associated_data)
        except SecretUnreadable as exc:
            raise SecretUnreadable(
                f"{sealed_table.what} of tenant {row['tenant_id']} {column} {row['context']!r}: {exc}"
            ) from None
        new = ring.seal(plaintext, associated_data)
        await conn.execute(
            f"""UPDATE {sealed_table.table} SET key_id = $3, nonce = $4, ciphertext = $5
                 WHERE tenant_id = $1 AND {column} = $2""",  # noqa: S608
            row["tenant_id"],
            row["context"],
            new.key_id,
            new.nonce,
            new.ciphertext,
        )
    return len(rows)


async def _reseal_batch(conn: Connection, ring: MasterKeyRing, batch_size: int) -> int:
    """One transaction re-encrypting up to ``batch_size`` rows, table after table."""
    done = 0
    async with conn.transaction():
        for sealed_table in SEALED_TABLES:
            if done >= batch_size:
                break
            done += await _reseal_rows(conn, ring, sealed_table, batch_size - done)
    return done


async def _count_old(conn: Connection, ring: MasterKeyRing) -> int:
    count = await conn.fetchval(
        f"SELECT count(*) FROM ({_ALL_KEY_IDS}) sealed WHERE key_id <> $1",  # noqa: S608
        ring.current_key_id,
    )
    return int(count)


async def rotate_master_key(
    pool: asyncpg.Pool,
    ring: MasterKeyRing,
    *,
    batch_size: int = 100,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Re-encrypt every sealed secret not under the current key; return how many rows.

    First runs ``verify_master_keys`` (so every key id in use must be in the
    ring and every key must match its canary; it writes the current key's
    canary). Then, in transactions of at most ``batch_size`` rows claimed with
    ``SELECT ... FOR UPDATE SKIP LOCKED``, opens each row whose ``key_id`` is
    not ``ring.current_key_id`` with its old key and seals it under the current
    key with the same associated data (the row's tenant id and channel, or
    tenant id and processor). Every table of ``SEALED_TABLES`` is covered:
    notification provider secrets (``provider_configs``) and payment
    processor secrets (``processor_configs``).
    Running processes keep working throughout: their rings hold both keys.
    Several rotations may run at once; each row is re-encrypted once. A second
    run returns 0. ``secret_fingerprint`` and ``updated_at`` are left alone:
    the secrets themselves do not change.

    ``progress(done, total)`` is called once before the first batch and after
    each committed batch; ``total`` is the number of rows under other keys at
    the start (raised if more appear meanwhile).

    Raises ``MasterKeyError`` from the start-up check, ``SecretUnreadable``
    (naming tenant and channel or processor) if a row does not open (its batch is rolled
    back, earlier batches stay committed, a rerun continues), ``ValueError``
    for ``batch_size < 1``, and ``TimeoutError`` if rows under old keys stay
    locked by other transactions for ``LOCKED_ROWS_WAIT_S`` seconds (run it
    again later).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    async with pool.acquire() as conn:
        await verify_master_keys(conn, ring)
        total = await _count_old(conn, ring)
        done = 0
        if progress is not None:
            progress(done, total)
        locked_since: float | None = None
        while True:
            count = await _reseal_batch(conn, ring, batch_size)
            if count:
                done += count
                total = max(total, done)
                locked_since = None
                if progress is not None:
                    progress(done, total)
                continue
            remaining = await _count_old(conn, ring)
            if remaining == 0:
                break
            # Every remaining row is locked by another transaction (a configuration
            # update, or another rotation): wait for it to commit, then look again.
            now = time.monotonic()
            if locked_since is None:
                locked_since = now
            elif now - locked_since > LOCKED_ROWS_WAIT_S:
                raise TimeoutError(
                    f"{remaining} sealed configuration(s) under old master keys stayed locked by other "
                    f"transactions for {LOCKED_ROWS_WAIT_S:.0f} s; {done} were re-encrypted. Run the "
                    "rotation again"
                )
            await asyncio.sleep(_LOCKED_ROWS_POLL_S)
    log.info("master key rotation finished", current_key_id=ring.current_key_id, reencrypted=done)
    return done
