"""The payment sweeper: re-publishes ``PaymentCommand``s whose operation stays unfinished past a deadline.

The relay publishes a command with ``acks=all`` and marks its outbox row
published; after that, nothing in the payment path would ever send it again.
But a broker can lose messages it acknowledged: Tansu (memory storage) loses
everything on a restart, real Kafka loses them on an unclean leader election
or when retention expires before the payment worker consumed them. The
janitor (payments/janitor.py) only looks after operations that were *started*
(a charge attempt, a capture or refund with a lease or a lookup schedule, a
cancel in flight). A command lost before the worker started its operation
would therefore leave it waiting forever. The sweeper covers exactly those:

==========  =======================================================  =====================
command     the operation is still waiting when                       re-published
==========  =======================================================  =====================
CREATE      the payment is REQUIRES_PROCESSING (no attempt started)   CREATE for the payment
CAPTURE     the capture is PENDING and was never scheduled            CAPTURE for the capture
            (``next_lookup_at`` NULL: not started, no retry due)
REFUND      the refund is PENDING and was never scheduled             REFUND for the refund
CANCEL      the payment is REQUIRES_CAPTURE with a cancel requested,  CANCEL for the payment
            not in flight (``cancel_next_lookup_at`` NULL) and not
            accepted for later by the processor (``cancel_accepted_at``)
==========  =======================================================  =====================

and only when the operation has not changed for ``after_s`` seconds and
**none of its commands is still in the outbox or was published within the
last ``after_s`` seconds** (``outbox.payment_operation_id``, migration 0018).
So a command waiting for the relay (the broker is down), a charge deferred
while every circuit breaker is open (its CREATE is due later), or a command
published a moment ago is left alone; a command published long ago whose
operation never moved is presumed lost. One deadline covers every kind:
``SWITCHBOARD_PAYMENT_SWEEP_AFTER_S`` (default 120 s), checked every
``SWITCHBOARD_RELAY_SWEEP_INTERVAL_S`` by the outbox relay, next to the
delivery sweeper (:func:`gateway.relay.sweep_unfinished_deliveries`).

**Duplicates are absorbed by the idempotent payment worker** (payments/execution.py),
under the payment row lock: a CREATE for a payment past REQUIRES_PROCESSING is
skipped (an UNKNOWN attempt is the janitor's; a PENDING attempt is sent again
with its SAME idempotency key ``{payment_id}_{attempt_no}``, so the processor
answers the first request's result or ``idempotency_key_in_use`` and never
charges twice; a new attempt is started only from REQUIRES_PROCESSING, or from
FAILED when every earlier attempt definitely did not charge); a CAPTURE or
REFUND is sent only while its operation is PENDING and unscheduled, once (the
first one moves it to PROCESSING with a lease); a CANCEL only while no cancel is
in flight. A command consumed but still queued behind a slow poll may be swept
too: the second copy finds the work done. Several relays may sweep at once
(``FOR UPDATE SKIP LOCKED`` on the operation rows, and the new outbox row
keeps the next sweep away).

Not covered (left to others, by design): a started operation (the janitor's
lease and lookup schedule); a capture, refund or cancel the processor accepted
for later (its webhook; an unverified one brings a lookup forward); the
``payment.canceled`` event of a payment canceled before processing, which its
CANCEL command publishes (a lost one loses only that event, never money).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import asyncpg

from channels.catalog import payment_commands_topic
from gateway.write_path import OUTBOX_NOTIFY_CHANNEL
from payments.store import command_operation_id, payment_command
from switchboard.payments.v1 import events_pb2

#: Operations swept per kind and round.
DEFAULT_LIMIT: Final = 1000


def _due(columns: str, table: str, waiting: str) -> str:
    """The claim of one kind: ``columns`` of the rows of ``table`` (alias ``x``) that match
    ``waiting``, have not changed since the deadline and have no command (outbox.payment_operation_id)
    unpublished or published after it. $1 is the sweep's "now", $2 the deadline in seconds, $3
    the limit. Every argument is a constant of this module; the values are bind parameters."""
    return f"""
SELECT {columns}
  FROM {table} x
 WHERE {waiting}
   AND x.updated_at < $1::timestamptz - make_interval(secs => $2)
   AND NOT EXISTS (SELECT 1 FROM outbox o
                    WHERE o.payment_operation_id = x.id
                      AND (o.published_at IS NULL
                           OR o.published_at >= $1::timestamptz - make_interval(secs => $2)))
 ORDER BY x.updated_at LIMIT $3
 FOR UPDATE OF x SKIP LOCKED"""  # noqa: S608


_OPERATION_COLUMNS: Final = (
    "x.tenant_id, x.payment_id, x.request_id, x.created_at AS requested_at, x.id AS op_id"
)
#: A capture or refund not started and without a retry due (not the janitor's).
_NEVER_STARTED: Final = "x.status = 'pending' AND x.next_lookup_at IS NULL"
_DUE: Final[dict[str, str]] = {
    "create": _due(
        "x.tenant_id, x.id AS payment_id, x.request_id, x.created_at AS requested_at, NULL::uuid AS op_id",
        "payments",
        "x.status = 'requires_processing'",
    ),
    "capture": _due(_OPERATION_COLUMNS, "payment_captures", _NEVER_STARTED),
    "refund": _due(_OPERATION_COLUMNS, "payment_refunds", _NEVER_STARTED),
    # The CancelPayment request_id is not stored: a swept CANCEL carries none.
    "cancel": _due(
        "x.tenant_id, x.id AS payment_id, '' AS request_id, x.cancel_requested_at AS requested_at, "
        "NULL::uuid AS op_id",
        "payments",
        """x.status = 'requires_capture' AND x.cancel_requested_at IS NOT NULL
   AND x.cancel_next_lookup_at IS NULL
   AND (x.cancel_accepted_at IS NULL OR x.cancel_accepted_at < x.cancel_requested_at)""",
    ),
}
_KINDS: Final[dict[str, events_pb2.PaymentCommandKind.ValueType]] = {
    "create": events_pb2.PAYMENT_COMMAND_KIND_CREATE,
    "capture": events_pb2.PAYMENT_COMMAND_KIND_CAPTURE,
    "refund": events_pb2.PAYMENT_COMMAND_KIND_REFUND,
    "cancel": events_pb2.PAYMENT_COMMAND_KIND_CANCEL,
}
_INSERT: Final = """
WITH o AS (
    INSERT INTO outbox (topic, key, payload, payment_operation_id)
    SELECT $1, convert_to(tenant::text, 'UTF8'), payload, operation
      FROM unnest($2::uuid[], $3::bytea[], $4::uuid[]) AS c(tenant, payload, operation)
    RETURNING 1)
SELECT count(*) FROM o"""


@dataclass(frozen=True)
class PaymentSweep:
    """What one sweep re-published: commands per kind."""

    creates: int = 0
    captures: int = 0
    refunds: int = 0
    cancels: int = 0

    @property
    def total(self) -> int:
        """Commands re-published."""
        return self.creates + self.captures + self.refunds + self.cancels


async def sweep_unfinished_payment_commands(
    pool: asyncpg.Pool,
    *,
    after_s: float,
    topic_prefix: str,
    limit: int = DEFAULT_LIMIT,
    now: datetime | None = None,
) -> PaymentSweep:
    """Re-publish, through the outbox, the command of every operation the module docstring lists
    that is unfinished ``after_s`` seconds after its last command was published; return the counts.

    At most ``limit`` operations per kind, oldest first, in ONE transaction: the operation rows are
    locked ``FOR UPDATE SKIP LOCKED`` (a payment the worker holds right now is left for the next
    sweep) and each new command row carries the operation id, so the next sweep waits for it.
    ``now`` (timezone-aware) replaces the database's ``now()`` as the reference time (tests).
    Raises asyncpg errors (then nothing was written). The relay is NOTIFYed when rows were added.
    """
    if not after_s >= 0 or limit < 1:
        raise ValueError("after_s must be >= 0 and limit at least 1")
    counts: dict[str, int] = {}
    async with pool.acquire() as conn, conn.transaction():
        reference = now if now is not None else await conn.fetchval("SELECT now()")
        tenants: list[uuid.UUID] = []
        payloads: list[bytes] = []
        operations: list[uuid.UUID] = []
        for name, sql in _DUE.items():
            rows = await conn.fetch(sql, reference, after_s, limit)
            counts[name] = len(rows)
            for row in rows:
                op_id: uuid.UUID | None = row["op_id"]
                command = payment_command(
                    _KINDS[name],
                    row["tenant_id"],
                    row["payment_id"],
                    row["request_id"],
                    row["requested_at"],
                    capture_id=op_id if name == "capture" else None,
                    refund_id=op_id if name == "refund" else None,
                )
                tenants.append(row["tenant_id"])
                payloads.append(command.SerializeToString())
                operations.append(command_operation_id(command))
        if payloads:
            await conn.fetchval(_INSERT, payment_commands_topic(topic_prefix), tenants, payloads, operations)
            await conn.execute("SELECT pg_notify($1, '')", OUTBOX_NOTIFY_CHANNEL)
    return PaymentSweep(counts["create"], counts["capture"], counts["refund"], counts["cancel"])
