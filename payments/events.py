"""``PaymentEvent`` messages: built from the changed payment, written to the transactional outbox.

Every payment status change the worker, the janitor or a webhook commits
(:func:`payments.state_machine.event_type_for`: ``payment.processing``,
``payment.succeeded``, ``payment.requires_capture``, ``payment.failed``,
``payment.unknown``, ``payment.canceled``, ``payment.captured``,
``payment.refunded``), and every capture or refund that ends FAILED
(:func:`payments.state_machine.operation_failed_event_type`:
``payment.capture_failed``, ``payment.refund_failed``), writes one
``switchboard.payments.v1.PaymentEvent`` into
the outbox **in the same transaction** as the change (:func:`publish_payment_event`):
topic ``<prefix>payments.events`` (:func:`channels.catalog.payment_events_topic`),
key = the tenant id (so one tenant's events stay in order), and the relay
publishes it like every outbox row. The event carries a snapshot of the
payment after the change, read inside that transaction.

**Event ids are deterministic**: ``uuid5(EVENT_ID_NAMESPACE,
"<payment id>/<event type>/<discriminator>")`` where the discriminator is the
attempt number (charge outcomes, ``payment.processing``), the capture id
(``payment.captured``, ``payment.capture_failed``), the refund id
(``payment.refunded``, ``payment.refund_failed``) or ``cancel``
(``payment.canceled``). A
payment reaches each of those at most once, so the id is unique per event,
and an event written again for the same change (a worker redoing work after
a crash, the accept-time cancel announced by a redelivered CANCEL command)
carries the same id: consumers deduplicate by ``event_id``
(payments/event_notifier.py derives its notification request_id from it).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Final

from google.protobuf import timestamp_pb2

from channels.catalog import payment_events_topic
from gateway.write_path import OUTBOX_NOTIFY_CHANNEL
from payments import store
from payments.state_machine import PaymentEventType, PaymentStatus
from switchboard.db.pool import Connection
from switchboard.payments.v1 import events_pb2, payments_pb2

#: The UUIDv5 namespace of PaymentEvent ids (a fixed random UUID; never change it).
EVENT_ID_NAMESPACE: Final = uuid.UUID("6f1c7f0e-3b1d-4c55-9a53-2f6d1f0a8c21")
#: Longest failure message carried in an event (characters).
MAX_FAILURE_MESSAGE_CHARS: Final = 1000


def event_id_for(payment_id: uuid.UUID, event_type: PaymentEventType, discriminator: str) -> uuid.UUID:
    """The deterministic id of ``event_type`` for payment ``payment_id`` (see the module docstring)."""
    return uuid.uuid5(EVENT_ID_NAMESPACE, f"{payment_id}/{event_type.value}/{discriminator}")


def build_payment_event(
    payment: payments_pb2.Payment,
    event_type: PaymentEventType,
    previous_status: PaymentStatus,
    occurred_at: datetime,
    *,
    attempt_no: int = 0,
    capture_id: uuid.UUID | None = None,
    refund_id: uuid.UUID | None = None,
) -> events_pb2.PaymentEvent:
    """The ``PaymentEvent`` of ``event_type`` for ``payment`` (its state after the change).

    ``previous_status``: the status before the change (SUCCEEDED for ``payment.refunded``,
    whose payment stays SUCCEEDED). ``occurred_at``: timezone-aware time of the change.
    ``capture_id`` / ``refund_id`` select the capture or refund carried by
    ``payment.captured`` / ``payment.capture_failed`` / ``payment.refunded`` /
    ``payment.refund_failed`` and discriminate their event ids; ``attempt_no`` the attempt
    of a charge outcome or of ``payment.processing``. ``failure_code`` / ``failure_message``
    are the payment's for ``payment.failed`` and the capture's or refund's for
    ``payment.capture_failed`` / ``payment.refund_failed``. Amounts are minor units.
    Raises ``LookupError`` when ``capture_id`` / ``refund_id`` is not one of the payment's.
    """
    payment_id = uuid.UUID(payment.payment_id)
    if capture_id is not None:
        discriminator = str(capture_id)
    elif refund_id is not None:
        discriminator = str(refund_id)
    elif event_type is PaymentEventType.CANCELED:
        discriminator = "cancel"
    else:
        discriminator = str(attempt_no)
    occur_time = timestamp_pb2.Timestamp()
    occur_time.FromDatetime(occurred_at)
    event = events_pb2.PaymentEvent(
        event_id=str(event_id_for(payment_id, event_type, discriminator)),
        event_type=event_type.value,
        tenant_id="",
        payment_id=payment.payment_id,
        status=payment.status,
        previous_status=store.PAYMENT_STATUS_PROTO[previous_status],
        amount_minor=payment.amount_minor,
        currency=payment.currency,
        amount_captured_minor=payment.amount_captured_minor,
        amount_refunded_minor=payment.amount_refunded_minor,
        customer=payment.customer,
        customer_reference=payment.customer_reference,
        description=payment.description,
        metadata=dict(payment.metadata),
        processor=payment.processor,
        processor_reference=payment.processor_reference,
        attempt_no=attempt_no,
        occur_time=occur_time,
    )
    if event_type is PaymentEventType.FAILED:
        event.failure_code = payment.failure_code
        event.failure_message = payment.failure_message[:MAX_FAILURE_MESSAGE_CHARS]
    if capture_id is not None:
        captures = [c for c in payment.captures if c.capture_id == str(capture_id)]
        if not captures:
            raise LookupError(f"payment {payment_id} has no capture {capture_id}")
        event.capture.CopyFrom(captures[0])
    if refund_id is not None:
        refunds = [r for r in payment.refunds if r.refund_id == str(refund_id)]
        if not refunds:
            raise LookupError(f"payment {payment_id} has no refund {refund_id}")
        event.refund.CopyFrom(refunds[0])
    if event_type in (PaymentEventType.CAPTURE_FAILED, PaymentEventType.REFUND_FAILED):
        failed = event.capture if event_type is PaymentEventType.CAPTURE_FAILED else event.refund
        event.failure_code = failed.failure_code
        event.failure_message = failed.failure_message[:MAX_FAILURE_MESSAGE_CHARS]
    return event


async def enqueue_payment_event(
    conn: Connection, topic_prefix: str, tenant_id: uuid.UUID, event: events_pb2.PaymentEvent
) -> None:
    """Write ``event`` (its ``tenant_id`` set here) to the outbox for ``<prefix>payments.events``,
    key = the tenant id, and NOTIFY the relay; inside the caller's transaction."""
    event.tenant_id = str(tenant_id)
    await conn.execute(
        """WITH o AS (INSERT INTO outbox (topic, key, payload) VALUES ($1, $2, $3) RETURNING 1)
           SELECT pg_notify($4, '') FROM o""",
        payment_events_topic(topic_prefix),
        str(tenant_id).encode("ascii"),
        event.SerializeToString(),
        OUTBOX_NOTIFY_CHANNEL,
    )


async def publish_payment_event(
    conn: Connection,
    topic_prefix: str,
    tenant_id: uuid.UUID,
    payment_id: uuid.UUID,
    event_type: PaymentEventType,
    previous_status: PaymentStatus,
    occurred_at: datetime,
    *,
    attempt_no: int = 0,
    capture_id: uuid.UUID | None = None,
    refund_id: uuid.UUID | None = None,
) -> events_pb2.PaymentEvent:
    """Read the payment as the caller's transaction sees it now, build its event and enqueue it.

    Call after the change, in the same transaction (the event commits with it).
    Returns the event. Raises ``LookupError`` if the payment (or the named capture or
    refund) does not exist for this tenant.
    """
    payment = await store.get_payment(conn, tenant_id, payment_id)
    if payment is None:
        raise LookupError(f"tenant {tenant_id} has no payment {payment_id}")
    event = build_payment_event(
        payment,
        event_type,
        previous_status,
        occurred_at,
        attempt_no=attempt_no,
        capture_id=capture_id,
        refund_id=refund_id,
    )
    await enqueue_payment_event(conn, topic_prefix, tenant_id, event)
    return event
