"""The dead-letter queue as an operator sees it: list and replay.

Every delivery that ends FAILED leaves a ``dead_letters`` row (and a
DeliveryDeadLettered event on ``notify.<channel>.dlq``). Replaying puts the
delivery back as new attempts: status QUEUED, a fresh budget (the attempt
limit and the age limit count from the replay), a new outbox row with its
original DeliveryRequested event, and the tenant's QUEUED status callback,
all in one transaction per dead letter, which is marked replayed in the same
transaction. Replay is idempotent: a dead letter is replayed at most once, and
only while its delivery is still FAILED, so replaying twice never delivers
twice.

A link of a fallback chain is replayed only while no other link of the same
notification is delivered, queued or sending: a chain never delivers on two
channels. Such a dead letter is skipped (reported, left pending). A replayed
link that fails again does not start its next channel a second time (that
link exists already and has its own dead letter). docs/providers.md,
"Replaying dead letters", describes this for operators.

"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg

from channels.callbacks import enqueue_status_change
from channels.catalog import delivery_topic
from gateway.status_stream import notify_delivery_status_changed
from gateway.write_path import OUTBOX_NOTIFY_CHANNEL
from switchboard.db.pool import Connection


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


@dataclass(frozen=True)
class SkippedDeadLetter:
    """A dead letter a replay left pending, and why (e.g. ``fallback chain delivered on sms``)."""

    letter: DeadLetter
    why: str


@dataclass
class ReplayReport:
    """What a replay did (or, for a dry run, would do).

    ``replayed``: dead letters put back as new attempts. ``skipped``: left
    pending because another link of their fallback chain is delivered or in
    progress. Dead letters taken by a concurrent replay, or whose delivery is
    no longer FAILED, are in neither.
    """

    replayed: int = 0
    skipped: list[SkippedDeadLetter] = field(default_factory=list)


#: Another link of the delivery's fallback chain that is delivered or still
#: in progress (the first along the chain), if the delivery is a chain link.
_CHAIN_BLOCKER_SQL = """
SELECT o.channel, o.status
  FROM deliveries d
  JOIN notifications n ON n.id = d.notification_id
  JOIN deliveries o ON o.notification_id = d.notification_id AND o.id <> d.id
 WHERE d.id = $1
   AND cardinality(n.fallback_channels) > 0
   AND o.status IN ('queued', 'sending', 'delivered')
 ORDER BY o.chain_position
 LIMIT 1
"""


async def _chain_blocker(conn: Connection | asyncpg.Pool, delivery_id: uuid.UUID) -> str | None:
    """Why replaying this chain link would send on a second channel, or ``None``."""
    other = await conn.fetchrow(_CHAIN_BLOCKER_SQL, delivery_id)
    if other is None:
        return None
    if other["status"] == "delivered":
        return f"fallback chain delivered on {other['channel']}"
    return _in_progress(other["channel"], other["status"])


def _in_progress(channel: str, status: str) -> str:
    return f"fallback chain in progress on {channel} ({status})"


async def _replay_one(
    conn: Connection, letter: DeadLetter, topic_prefix: str, now: datetime, report: ReplayReport
) -> None:
    """Replay ``letter`` in the caller's transaction (see the module docstring)."""
    locked = await conn.fetchval(
        "SELECT id FROM dead_letters WHERE id = $1 AND replayed_at IS NULL FOR UPDATE SKIP LOCKED",
        letter.id,
    )
    if locked is None:
        return  # replayed meanwhile, or being replayed by a concurrent run
    # Replays of two links of one chain take turns (the notification row lock), so
    # both cannot see the other link FAILED and both go ahead.
    await conn.execute(
        """SELECT 1 FROM notifications n JOIN deliveries d ON d.notification_id = n.id
            WHERE d.id = $1 FOR NO KEY UPDATE OF n""",
        letter.delivery_id,
    )
    blocker = await _chain_blocker(conn, letter.delivery_id)
    if blocker is not None:
        report.skipped.append(SkippedDeadLetter(letter, blocker))
        return
    replayed_row = await conn.fetchrow(
        """UPDATE deliveries
              SET status = 'queued', attempts_before_replay = attempts, replays = replays + 1,
                  last_replayed_at = $2, next_attempt_at = NULL, last_enqueued_at = now(), updated_at = now()
            WHERE id = $1 AND status = 'failed'
        RETURNING event, notification_id, attempts""",
        letter.delivery_id,
        now,
    )
    await conn.execute("UPDATE dead_letters SET replayed_at = $2 WHERE id = $1", letter.id, now)
    if replayed_row is None:
        return  # no longer FAILED (replayed through an older dead letter): nothing to send
    await notify_delivery_status_changed(conn, replayed_row["notification_id"])
    await enqueue_status_change(
        conn,
        tenant_id=letter.tenant_id,
        delivery_id=letter.delivery_id,
        notification_id=replayed_row["notification_id"],
        channel=letter.channel,
        status="queued",
        attempt=replayed_row["attempts"],
        error="",
        provider_message_id="",
        occurred_at=now,
    )
    await conn.execute(
        "INSERT INTO outbox (topic, key, payload, delivery_id) VALUES ($1, $2, $3, $4)",
        delivery_topic(letter.channel, topic_prefix),
        str(letter.tenant_id).encode("ascii"),
        replayed_row["event"],
        letter.delivery_id,
    )
    await conn.execute("SELECT pg_notify($1, '')", OUTBOX_NOTIFY_CHANNEL)
    report.replayed += 1


async def replay_dead_letters(
    pool: asyncpg.Pool,
    where: DeadLetterFilter,
    *,
    topic_prefix: str = "",
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
    clock: Callable[[], float] = time.time,
) -> ReplayReport:
    """Replay every pending dead letter matching ``where``, oldest first; see the module docstring.

    One transaction per dead letter. With ``dry_run`` nothing is written and
    the report says what a replay would do now: the same checks, read only.
    ``progress(done, total)`` is called after each one. Dead letters taken by
    a concurrent replay (row locks, SKIP LOCKED) are left to it. ``clock``
    (Unix seconds) stamps the replay, from which the delivery's age limit
    counts. Database errors propagate; dead letters replayed before the error
    stay replayed.
    """
    pending = await list_dead_letters(pool, where, limit=1_000_000)
    report = ReplayReport()
    #: Dry run: chains a dead letter earlier in this run would have put back in progress.
    would_queue: dict[uuid.UUID, str] = {}
    for done, letter in enumerate(pending, start=1):
        if dry_run:
            delivery = await pool.fetchrow(
                """SELECT d.status, d.notification_id, cardinality(n.fallback_channels) > 0 AS chained
                     FROM deliveries d JOIN notifications n ON n.id = d.notification_id WHERE d.id = $1""",
                letter.delivery_id,
            )
            blocker = await _chain_blocker(pool, letter.delivery_id)
            if blocker is None and delivery is not None and delivery["chained"]:
                blocker = would_queue.get(delivery["notification_id"])
            if blocker is not None:
                report.skipped.append(SkippedDeadLetter(letter, blocker))
            elif delivery is not None and delivery["status"] == "failed":
                report.replayed += 1
                would_queue[delivery["notification_id"]] = _in_progress(letter.channel, "queued")
        else:
            async with pool.acquire() as conn, conn.transaction():
                await _replay_one(conn, letter, topic_prefix, datetime.fromtimestamp(clock(), UTC), report)
        if progress is not None:
            progress(done, len(pending))
    return report
