"""The dead-letter queue as an operator sees it: list and replay.

Every delivery that ends FAILED leaves a ``dead_letters`` row (and a
DeliveryDeadLettered event on ``notify.<channel>.dlq``). Replaying puts the
delivery back as new attempts: status QUEUED, a fresh attempt budget, and a
new outbox row with its original DeliveryRequested event, all in one
transaction per dead letter, which is marked replayed in the same
transaction. Replay is idempotent: a dead letter is replayed at most once, and
only while its delivery is still FAILED, so replaying twice never delivers
twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from channels.catalog import delivery_topic
from gateway.status_stream import notify_delivery_status_changed
from gateway.write_path import OUTBOX_NOTIFY_CHANNEL


@dataclass(frozen=True)
class DeadLetterFilter:
    """Which dead letters: all fields optional; ``reason`` is a case-insensitive substring."""

    tenant_id: uuid.UUID | None = None
    channel: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    reason: str | None = None

    def where(self, first_param: int = 1) -> tuple[str, list[object]]:
        """The SQL condition (on alias ``d``) and its parameters, numbered from ``first_param``."""
        conditions = ["d.replayed_at IS NULL"]
        params: list[object] = []
        for column, op, value in (
            ("d.tenant_id", "=", self.tenant_id),
            ("d.channel", "=", self.channel),
            ("d.dead_lettered_at", ">=", self.since),
            ("d.dead_lettered_at", "<", self.until),
        ):
            if value is not None:
                params.append(value)
                conditions.append(f"{column} {op} ${first_param + len(params) - 1}")
        if self.reason:
            params.append(f"%{self.reason}%")
            conditions.append(f"d.reason ILIKE ${first_param + len(params) - 1}")
        return " AND ".join(conditions), params


@dataclass(frozen=True)
class DeadLetter:
    """One pending dead letter."""

    id: int
    delivery_id: uuid.UUID
    tenant_id: uuid.UUID
    channel: str
    reason: str
    attempts: int
    dead_lettered_at: datetime


async def list_dead_letters(
    pool: asyncpg.Pool, where: DeadLetterFilter, limit: int = 1000
) -> list[DeadLetter]:
    """Pending (not replayed) dead letters matching ``where``, oldest first."""
    condition, params = where.where()
    rows = await pool.fetch(
        f"""SELECT d.id, d.delivery_id, d.tenant_id, d.channel, d.reason, d.attempts, d.dead_lettered_at
              FROM dead_letters d WHERE {condition}
             ORDER BY d.dead_lettered_at, d.id LIMIT {int(limit)}""",  # noqa: S608 (condition is built from constants)
        *params,
    )
    return [DeadLetter(**dict(r)) for r in rows]


async def replay_dead_letters(
    pool: asyncpg.Pool,
    where: DeadLetterFilter,
    *,
    topic_prefix: str = "",
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Replay every pending dead letter matching ``where``; return how many were replayed.

    With ``dry_run`` nothing changes and the return value is how many would be.
    ``progress(done, total)`` is called after each one. Dead letters taken by a
    concurrent replay (row locks, SKIP LOCKED) are left to it.
    """
    pending = await list_dead_letters(pool, where, limit=1_000_000)
    if dry_run:
        return len(pending)
    replayed = 0
    for done, letter in enumerate(pending, start=1):
        async with pool.acquire() as conn, conn.transaction():
            locked = await conn.fetchval(
                "SELECT id FROM dead_letters WHERE id = $1 AND replayed_at IS NULL FOR UPDATE SKIP LOCKED",
                letter.id,
            )
            if locked is not None:
                replayed_row = await conn.fetchrow(
                    """UPDATE deliveries
                          SET status = 'queued', attempts_before_replay = attempts, replays = replays + 1,
                              next_attempt_at = NULL, last_enqueued_at = now(), updated_at = now()
                        WHERE id = $1 AND status = 'failed'
                    RETURNING event, notification_id""",
                    letter.delivery_id,
                )
                await conn.execute("UPDATE dead_letters SET replayed_at = now() WHERE id = $1", letter.id)
                if replayed_row is not None:
                    event = replayed_row["event"]
                    await notify_delivery_status_changed(conn, replayed_row["notification_id"])
                    await conn.execute(
                        "INSERT INTO outbox (topic, key, payload, delivery_id) VALUES ($1, $2, $3, $4)",
                        delivery_topic(letter.channel, topic_prefix),
                        str(letter.tenant_id).encode("ascii"),
                        event,
                        letter.delivery_id,
                    )
                    await conn.execute("SELECT pg_notify($1, '')", OUTBOX_NOTIFY_CHANNEL)
                    replayed += 1
        if progress is not None:
            progress(done, len(pending))
    return replayed
