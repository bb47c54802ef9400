"""The payment event notifier: ``payments.events`` -> notification rules -> notifications.

One consumer group (``<prefix>switchboard.payment-notifier``) reads the
``PaymentEvent`` messages the payment worker publishes (through the outbox)
on ``<prefix>payments.events``, keyed by tenant id. For each event it loads
the tenant's enabled rules for the event type
(:func:`payments.notification_rules.rules_for_event`), renders one
``SendNotificationRequest`` per rule, validates it like the gateway does
(:func:`gateway.validation.validate_send_request`) and accepts all of them in
ONE transaction through the normal write path
(:func:`gateway.write_path.accept_notifications`) in the tenant's name. The
relay and the channel workers then deliver them like any notification.

Effectively once: the ``request_id`` of each notification is derived from
the rule id and the event id, so an event delivered again (Kafka
redelivery after a crash, a republished outbox row) replays the stored
answer and writes nothing. Event ids are deterministic per payment change
(payments/events.py), so even the same change written to the outbox twice
is notified once. The guarantee holds for the idempotency retention
(``SWITCHBOARD_IDEMPOTENCY_RETENTION_S``, 24 h by default); an event
redelivered later than that would be notified again. If the rule was changed
between the two deliveries, the write path answers ``FAILED_PRECONDITION``
(the key was used for a different request): that is logged and counted as
already notified, never sent twice.

Offsets are committed only after every event of a poll has its outcome
committed in PostgreSQL (at-least-once consumption; the idempotency key
absorbs the repeats). Events of one tenant (one partition and key) are
handled in order, different tenants concurrently. An event that cannot be
decoded, has no rule, or fires a rule whose notification cannot be built
(no recipient, unknown currency, a rendered field over its limit) is logged
and skipped; its offset is committed. A database or broker error closes the
consumer without committing and rebuilds it, so the poll is redone.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from enum import StrEnum

import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from google.protobuf.message import DecodeError
from google.rpc import code_pb2

from channels.catalog import all_topics, payment_events_topic
from gateway.validation import RequestInvalid, validate_send_request
from gateway.write_path import AcceptOutcome, AcceptRequest, accept_notifications
from payments.notification_rules import NotificationRule, RenderError, render_notification, rules_for_event
from switchboard.kafka import ensure_topics
from switchboard.notify.v1 import notify_pb2
from switchboard.payments.v1 import events_pb2
from switchboard.settings import Settings

log = structlog.get_logger(__name__)

MAX_RECORDS_PER_POLL = 500
#: Accept attempts when the write path answers ABORTED (an expired key reaped mid-read; safe to retry).
MAX_ACCEPT_ATTEMPTS = 3


def consumer_group(prefix: str = "") -> str:
    """The notifier's consumer group: ``<prefix>switchboard.payment-notifier``."""
    return f"{prefix}switchboard.payment-notifier"


class Outcome(StrEnum):
    """What happened to one event (``UNDECODABLE``, ``NO_RULE``) or to one rule fired by an event."""

    #: A notification was accepted (new, or replayed from the idempotency record).
    ACCEPTED = "accepted"
    #: The key was used for a different request: the rule changed since the event was first notified.
    ALREADY_NOTIFIED = "already_notified"
    #: The rule could not be rendered or validated for this event (logged with the reason).
    SKIPPED = "skipped"
    #: The tenant has no enabled rule for the event type.
    NO_RULE = "no_rule"
    #: The message is not a PaymentEvent with UUID tenant, payment and event ids.
    UNDECODABLE = "undecodable"


def _decode(record: ConsumerRecord[bytes, bytes]) -> tuple[events_pb2.PaymentEvent, uuid.UUID, uuid.UUID]:
    """The event, its tenant id and its event id; raises ``ValueError``/``DecodeError``."""
    event = events_pb2.PaymentEvent.FromString(record.value or b"")
    tenant_id = uuid.UUID(event.tenant_id)
    event_id = uuid.UUID(event.event_id)
    uuid.UUID(event.payment_id)
    if not event.event_type:
        raise ValueError("event_type is empty")
    return event, tenant_id, event_id


class PaymentEventNotifier:
    """Consumes ``payments.events`` and accepts the notifications the tenants' rules ask for.

    Run it with :meth:`run` (a task) and end it with :meth:`stop`; it can share
    a process (and ``pool``) with other workers. ``outcomes`` counts
    :class:`Outcome` values; ``events_handled`` counts events whose outcome is
    committed (both for metrics and tests).
    """

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self._pool = pool
        self._settings = settings
        self._stopping = asyncio.Event()
        self.outcomes: Counter[Outcome] = Counter()
        self.events_handled = 0

    def stop(self) -> None:
        """Finish the current poll, commit its offsets, and return from :meth:`run`."""
        self._stopping.set()

    def _make_consumer(self) -> AIOKafkaConsumer:
        s = self._settings
        return AIOKafkaConsumer(
            payment_events_topic(s.kafka_topic_prefix),
            bootstrap_servers=s.require_kafka_bootstrap(),
            group_id=consumer_group(s.kafka_topic_prefix),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=MAX_RECORDS_PER_POLL,
            request_timeout_ms=s.kafka_request_timeout_ms + 30_000,
        )

    async def run(self) -> None:
        """Consume until :meth:`stop`; rebuild the consumer (uncommitted) after any failure."""
        backoff_s = self._settings.relay_error_backoff_ms / 1000
        prefix = self._settings.kafka_topic_prefix
        topics = list(dict.fromkeys([*all_topics(prefix), payment_events_topic(prefix)]))
        while not self._stopping.is_set():
            consumer: AIOKafkaConsumer | None = None
            # Joining a consumer group takes a few seconds even when all is well.
            startup_s = max(30.0, 3 * self._settings.kafka_request_timeout_ms / 1000)
            try:
                async with asyncio.timeout(startup_s):
                    await ensure_topics(self._settings, topics)
                    consumer = self._make_consumer()
                    await consumer.start()
                await self._consume(consumer)
            except Exception as exc:
                log.warning("payment notifier: restarting consumer", error=repr(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff_s)
            finally:
                if consumer is not None:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(self._settings.kafka_request_timeout_ms / 1000):
                            await consumer.stop()

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        while not self._stopping.is_set():
            batches = await consumer.getmany(timeout_ms=500, max_records=MAX_RECORDS_PER_POLL)
            records = [r for rs in batches.values() for r in rs]
            if not records:
                continue
            await self.handle_records(records)
            offsets = {tp: OffsetAndMetadata(rs[-1].offset + 1, "") for tp, rs in batches.items() if rs}
            await self.commit_offsets(consumer, offsets)
            self.events_handled += len(records)

    async def commit_offsets(
        self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, OffsetAndMetadata]
    ) -> None:
        """Commit ``offsets``; called only after every outcome of the poll is committed."""
        async with asyncio.timeout(self._settings.kafka_request_timeout_ms / 1000):
            await consumer.commit(offsets)

    async def handle_records(self, records: Iterable[ConsumerRecord[bytes, bytes]]) -> None:
        """Handle ``records``: in order per (partition, key), concurrently across them."""
        lanes: dict[tuple[int, bytes | None], list[ConsumerRecord[bytes, bytes]]] = defaultdict(list)
        for record in records:
            lanes[(record.partition, record.key)].append(record)

        async def run_lane(lane: list[ConsumerRecord[bytes, bytes]]) -> None:
            for record in lane:
                await self.handle_record(record)

        async with asyncio.TaskGroup() as group:
            for lane in lanes.values():
                group.create_task(run_lane(lane))

    async def handle_record(self, record: ConsumerRecord[bytes, bytes]) -> list[Outcome]:
        """Handle one event; return its outcome(s): one per rule fired, or NO_RULE / UNDECODABLE.

        Raises asyncpg's exception when PostgreSQL fails (nothing of this
        event is written; the caller must not commit the offset).
        """
        try:
            event, tenant_id, event_id = _decode(record)
        except (ValueError, DecodeError) as exc:
            log.error(
                "payment notifier: undecodable event skipped",
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                error=repr(exc),
            )
            return self._count([Outcome.UNDECODABLE])
        rules = await rules_for_event(self._pool, tenant_id, event.event_type)
        if not rules:
            log.debug("payment notifier: no rule", tenant_id=str(tenant_id), event_type=event.event_type)
            return self._count([Outcome.NO_RULE])
        context = {
            "tenant_id": str(tenant_id),
            "event_id": str(event_id),
            "event_type": event.event_type,
            "payment_id": event.payment_id,
        }
        outcomes: list[Outcome] = []
        items: list[AcceptRequest] = []
        fired: list[NotificationRule] = []
        for rule in rules:
            item = self._build(rule, event, event_id, context)
            if item is None:
                outcomes.append(Outcome.SKIPPED)
            else:
                items.append(item)
                fired.append(rule)
        if items:
            accepted = await self._accept(tenant_id, items)
            for rule, outcome in zip(fired, accepted, strict=True):
                outcomes.append(self._log_outcome(rule, outcome, context))
        return self._count(outcomes)

    def _build(
        self,
        rule: NotificationRule,
        event: events_pb2.PaymentEvent,
        event_id: uuid.UUID,
        context: dict[str, str],
    ) -> AcceptRequest | None:
        """The validated request ``rule`` sends for ``event``, or ``None`` (logged) when it cannot."""
        try:
            rendered = render_notification(rule, event, event_id)
        except RenderError as exc:
            log.warning(
                "payment notification skipped: cannot render", rule=rule.spec.name, reason=str(exc), **context
            )
            return None
        for channel, reason in rendered.skipped:
            log.warning(
                "payment notification skipped", rule=rule.spec.name, channel=channel, reason=reason, **context
            )
        if rendered.request is None:
            return None
        try:
            plan = validate_send_request(rendered.request)
        except RequestInvalid as exc:
            log.warning(
                "payment notification skipped: invalid after rendering",
                rule=rule.spec.name,
                violations=[f"{v.field}: {v.description}" for v in exc.violations],
                **context,
            )
            return None
        return AcceptRequest(rendered.request, plan)

    async def _accept(self, tenant_id: uuid.UUID, items: list[AcceptRequest]) -> list[AcceptOutcome]:
        """Accept ``items`` in the tenant's name; items answered ABORTED are retried (bounded).

        Raises ``RuntimeError`` if a key stays in flux after
        :data:`MAX_ACCEPT_ATTEMPTS` (the consumer restarts; the event is redone).
        """
        outcomes: list[AcceptOutcome | None] = [None] * len(items)
        pending = list(range(len(items)))
        for _ in range(MAX_ACCEPT_ATTEMPTS):
            answers = await accept_notifications(
                self._pool,
                tenant_id,
                [items[i] for i in pending],
                topic_prefix=self._settings.kafka_topic_prefix,
                retention_s=self._settings.idempotency_retention_s,
            )
            retry: list[int] = []
            for index, answer in zip(pending, answers, strict=True):
                if isinstance(answer, notify_pb2.SendNotificationResponse) or answer.code != code_pb2.ABORTED:
                    outcomes[index] = answer
                else:
                    retry.append(index)
            pending = retry
            if not pending:
                return [o for o in outcomes if o is not None]
        raise RuntimeError(f"idempotency keys still in flux after {MAX_ACCEPT_ATTEMPTS} attempts")

    def _log_outcome(
        self, rule: NotificationRule, outcome: AcceptOutcome, context: dict[str, str]
    ) -> Outcome:
        if isinstance(outcome, notify_pb2.SendNotificationResponse):
            log.info(
                "payment notification accepted",
                rule=rule.spec.name,
                notification_id=outcome.notification_id,
                **context,
            )
            return Outcome.ACCEPTED
        if outcome.code == code_pb2.FAILED_PRECONDITION:
            log.info(
                "payment notification already sent (the rule changed since)", rule=rule.spec.name, **context
            )
            return Outcome.ALREADY_NOTIFIED
        log.warning(
            "payment notification refused by the write path",
            rule=rule.spec.name,
            code=code_pb2.Code.Name(outcome.code),
            message=outcome.message,
            **context,
        )
        return Outcome.SKIPPED

    def _count(self, outcomes: list[Outcome]) -> list[Outcome]:
        self.outcomes.update(outcomes)
        return outcomes


async def run_event_notifier(settings: Settings) -> None:
    """Run the payment event notifier as a process until SIGTERM/SIGINT, then drain.

    Opens its own pool (``SWITCHBOARD_DATABASE_URL``) and consumer
    (``SWITCHBOARD_KAFKA_BOOTSTRAP``); on the signal it finishes the current
    poll and commits its offsets within ``shutdown_grace_s``. Raises
    ``RuntimeError`` if either URL is not set.
    """
    from switchboard.db.pool import create_pool
    from switchboard.signals import drain, wait_for_shutdown_signal

    settings.require_kafka_bootstrap()
    pool = await create_pool(settings)
    notifier = PaymentEventNotifier(pool, settings)
    task = asyncio.create_task(notifier.run())
    log.info("payment notifier running", topic=payment_events_topic(settings.kafka_topic_prefix))
    await wait_for_shutdown_signal()
    notifier.stop()

    async def shut_down() -> None:
        await task
        await pool.close()

    await drain(shut_down(), settings.shutdown_grace_s)
    log.info("payment notifier stopped", outcomes=dict(notifier.outcomes))
