"""The payment janitor: finds out what happened to operations whose outcome is not known.

Every ``payment-worker`` process runs one (several janitors share the work).
Each round (:meth:`PaymentJanitor.run_once`, every
``SWITCHBOARD_PAYMENT_JANITOR_INTERVAL_S``) claims, oldest due first and at most
``SWITCHBOARD_PAYMENT_JANITOR_BATCH_SIZE`` of each kind:

- charge attempts PENDING or UNKNOWN with ``next_lookup_at <= now``: UNKNOWN
  ones (the answer was lost), PENDING ones whose worker died mid-call (their
  lease expired), PENDING ones the processor is still working on;
- captures and refunds PENDING, PROCESSING or UNKNOWN with ``next_lookup_at <= now``
  (a retry scheduled after "not processed", a worker that died mid-call, a lost answer);
- payments whose cancel (release of the authorization) is due again
  (``cancel_next_lookup_at <= now``).

A claim is one statement per kind: ``SELECT ... FOR UPDATE SKIP LOCKED`` (two
janitors never take the same row) that moves ``next_lookup_at`` to now +
:data:`JANITOR_LEASE_S` and returns that value as the claim's lease; for
attempts it also counts the lookup as a send (``sends + 1``: a lookup by
replay, as Adyen's, may charge). If the janitor dies, the row is due again
when the lease ends. The lease is then handed to
:func:`payments.execution.resolve_attempt` (``lookup_charge``: found
charged/authorized -> resolved with journal and event; declined -> FAILED;
definitively absent -> FAILED and failover; cannot tell -> next schedule
step), :func:`~payments.execution.execute_capture` /
:func:`~payments.execution.execute_refund` / :func:`~payments.execution.execute_cancel`
with ``claimed=`` (the same request again with the same idempotency key).
Whoever changed the row since the claim wins: the janitor's answer is then
dropped (its lease no longer matches).

The schedule (``SWITCHBOARD_PAYMENT_LOOKUP_SCHEDULE_S``, default
``300,3600,86400``): the first lookup 5 minutes after the answer was lost,
the next 1 hour after that, then daily. All times come from the executor's
clock, so tests drive the janitor with a fake clock and no sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Final

import structlog

from payments.execution import (
    Executor,
    Outcome,
    execute_cancel,
    execute_capture,
    execute_refund,
    resolve_attempt,
)

log = structlog.get_logger(__name__)

#: How long a claimed row is the janitor's (seconds): longer than any lookup takes
#: (Stripe's list fallback reads up to 10 pages of 30 s timeouts).
JANITOR_LEASE_S: Final = 600.0

_CLAIM_ATTEMPTS = """
WITH due AS (
    SELECT payment_id, attempt_no FROM payment_attempts
     WHERE next_lookup_at <= $1 AND status IN ('pending', 'unknown')
     ORDER BY next_lookup_at
     LIMIT $2
     FOR UPDATE SKIP LOCKED)
UPDATE payment_attempts a SET next_lookup_at = $3, sends = a.sends + 1
  FROM due WHERE a.payment_id = due.payment_id AND a.attempt_no = due.attempt_no
RETURNING a.tenant_id, a.payment_id, a.attempt_no, a.next_lookup_at"""

_CLAIM_CAPTURES = """
WITH due AS (
    SELECT id FROM payment_captures
     WHERE next_lookup_at <= $1 AND status IN ('pending', 'processing', 'unknown')
     ORDER BY next_lookup_at
     LIMIT $2
     FOR UPDATE SKIP LOCKED)
UPDATE payment_captures c SET next_lookup_at = $3 FROM due WHERE c.id = due.id
RETURNING c.tenant_id, c.payment_id, c.id, c.next_lookup_at"""

_CLAIM_REFUNDS = """
WITH due AS (
    SELECT id FROM payment_refunds
     WHERE next_lookup_at <= $1 AND status IN ('pending', 'processing', 'unknown')
     ORDER BY next_lookup_at
     LIMIT $2
     FOR UPDATE SKIP LOCKED)
UPDATE payment_refunds r SET next_lookup_at = $3 FROM due WHERE r.id = due.id
RETURNING r.tenant_id, r.payment_id, r.id, r.next_lookup_at"""

_CLAIM_CANCELS = """
WITH due AS (
    SELECT id FROM payments
     WHERE cancel_next_lookup_at <= $1
     ORDER BY cancel_next_lookup_at
     LIMIT $2
     FOR UPDATE SKIP LOCKED)
UPDATE payments p SET cancel_next_lookup_at = $3 FROM due WHERE p.id = due.id
RETURNING p.tenant_id, p.id AS payment_id, p.cancel_next_lookup_at AS next_lookup_at"""


@dataclass
class JanitorReport:
    """What one round did: outcomes per kind (``attempts``, ``captures``, ``refunds``, ``cancels``)
    and how many items raised (logged; they are due again after the lease)."""

    attempts: Counter[Outcome] = field(default_factory=Counter)
    captures: Counter[Outcome] = field(default_factory=Counter)
    refunds: Counter[Outcome] = field(default_factory=Counter)
    cancels: Counter[Outcome] = field(default_factory=Counter)
    errors: int = 0

    @property
    def claimed(self) -> int:
        """Items claimed this round."""
        counted = (self.attempts, self.captures, self.refunds, self.cancels)
        return sum(sum(c.values()) for c in counted) + self.errors


class PaymentJanitor:
    """Claims due operations and resolves them with ``executor`` (see the module docstring).

    ``interval_s``: seconds between rounds; ``batch_size``: rows claimed per kind and
    round; ``concurrency``: items resolved at once. Raises ``ValueError`` for bad limits.
    """

    def __init__(
        self, executor: Executor, *, interval_s: float = 10.0, batch_size: int = 100, concurrency: int = 8
    ) -> None:
        if not interval_s > 0 or batch_size < 1 or concurrency < 1:
            raise ValueError("interval_s must be positive, batch_size and concurrency at least 1")
        self._ex = executor
        self._interval_s = interval_s
        self._batch_size = batch_size
        self._concurrency = concurrency
        self._stopping = asyncio.Event()
        self.rounds = 0

    def stop(self) -> None:
        """Finish the current round and return from :meth:`run`."""
        self._stopping.set()

    async def run(self) -> None:
        """Run rounds every ``interval_s`` until :meth:`stop`; a failed round is logged and retried."""
        while not self._stopping.is_set():
            try:
                report = await self.run_once()
                if report.claimed:
                    log.info(
                        "payment janitor round",
                        attempts=dict(report.attempts),
                        captures=dict(report.captures),
                        refunds=dict(report.refunds),
                        cancels=dict(report.cancels),
                        errors=report.errors,
                    )
            except Exception as exc:
                log.warning("payment janitor round failed", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval_s)

    async def run_once(self) -> JanitorReport:
        """One round: claim what is due now (executor clock) and resolve it. Returns the report.

        Raises asyncpg errors from the claims (items already claimed stay leased).
        """
        self.rounds += 1
        now = self._ex.clock()
        lease = now + timedelta(seconds=JANITOR_LEASE_S)
        pool = self._ex.pool
        attempts = await pool.fetch(_CLAIM_ATTEMPTS, now, self._batch_size, lease)
        captures = await pool.fetch(_CLAIM_CAPTURES, now, self._batch_size, lease)
        refunds = await pool.fetch(_CLAIM_REFUNDS, now, self._batch_size, lease)
        cancels = await pool.fetch(_CLAIM_CANCELS, now, self._batch_size, lease)
        report = JanitorReport()
        ex = self._ex
        work: list[tuple[Counter[Outcome], Callable[[], Awaitable[Outcome]], str]] = [
            *(
                (
                    report.attempts,
                    partial(resolve_attempt, ex, r["tenant_id"], r["payment_id"], r["attempt_no"], lease),
                    "attempt",
                )
                for r in attempts
            ),
            *(
                (
                    report.captures,
                    partial(execute_capture, ex, r["tenant_id"], r["payment_id"], r["id"], claimed=lease),
                    "capture",
                )
                for r in captures
            ),
            *(
                (
                    report.refunds,
                    partial(execute_refund, ex, r["tenant_id"], r["payment_id"], r["id"], claimed=lease),
                    "refund",
                )
                for r in refunds
            ),
            *(
                (
                    report.cancels,
                    partial(execute_cancel, ex, r["tenant_id"], r["payment_id"], claimed=lease),
                    "cancel",
                )
                for r in cancels
            ),
        ]
        limit = asyncio.Semaphore(self._concurrency)

        async def one(counter: Counter[Outcome], job: Callable[[], Awaitable[Outcome]], kind: str) -> None:
            async with limit:
                try:
                    counter[await job()] += 1
                except Exception as exc:
                    report.errors += 1
                    log.warning("payment janitor item failed", kind=kind, error=repr(exc))

        async with asyncio.TaskGroup() as group:
            for counter, job, kind in work:
                group.create_task(one(counter, job, kind))
        return report
