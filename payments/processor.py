"""What every payment processor connector implements, and how its failures are classified.

A connector (payments/stripe.py, payments/adyen.py) turns one processor's
public HTTP API into these calls. Amounts are integers in minor units of an
ISO 4217 currency (``currency`` is the upper-case three-letter code, e.g.
``"EUR"``; 1050 EUR minor units = 10.50 EUR).

Every mutating call carries an idempotency key. For charges it is
``{payment_id}_{attempt_no}`` (:attr:`ChargeRequest.idempotency_key`): a retried
or replayed call with the same key can never charge twice at a processor that
honours the key.

Failures are split by what they tell us about money moving, because the
payment state machine acts differently on each:

- :class:`Declined`: the processor answered and definitively did not charge
  (card declined, insufficient funds). Final for this attempt; failover is allowed.
- :class:`PermanentProcessorError`: the processor answered with an error that a
  retry will not fix (bad credentials, invalid request); nothing was charged.
  Failover is allowed.
- :class:`RetryableProcessorError`: the processor answered that it did NOT
  process the request and may later (429 rate limit, "lock timeout", a
  connection refused before any byte was sent). Same attempt may be retried
  with the same idempotency key.
- :class:`AmbiguousProcessorError`: we do not know whether money moved (timeout
  after the request was sent, connection reset, 5xx, a malformed answer). The
  attempt becomes UNKNOWN and only the janitor, by looking the payment up
  (:meth:`PaymentProcessor.lookup_charge`), may resolve it.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


class ProcessorStatus(enum.StrEnum):
    """A processor-side payment's state, mapped from the processor's own states."""

    SUCCEEDED = "succeeded"  # charged (captured)
    REQUIRES_CAPTURE = "requires_capture"  # authorized, waiting for capture
    PROCESSING = "processing"  # accepted, outcome follows asynchronously (webhook / lookup)
    FAILED = "failed"  # definitively not charged
    CANCELED = "canceled"  # authorization released


class CaptureMethod(enum.StrEnum):
    """When the authorized amount is captured: at once, or by a later CapturePayment."""

    AUTOMATIC = "automatic"
    MANUAL = "manual"


@dataclass(frozen=True)
class ChargeRequest:
    """One attempt to charge: what the connector sends to create (and confirm) a payment.

    ``amount_minor`` > 0 in minor units of ``currency`` (ISO 4217).
    ``payment_method`` is the processor's payment-method token (e.g. Stripe ``pm_...``).
    """

    payment_id: uuid.UUID
    attempt_no: int
    amount_minor: int
    currency: str
    payment_method: str
    capture_method: CaptureMethod
    customer_reference: str = ""
    description: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def idempotency_key(self) -> str:
        """``{payment_id}_{attempt_no}``: the processor-side idempotency key of this attempt."""
        return f"{self.payment_id}_{self.attempt_no}"


@dataclass(frozen=True)
class ProcessorPayment:
    """The processor's view of a payment after a call or a lookup.

    ``processor_reference`` is the processor's id (Stripe ``pi_...``, Adyen
    ``pspReference``). Amounts are minor units. ``decline_code`` and
    ``message`` explain a FAILED status and never contain credentials.
    """

    processor_reference: str
    status: ProcessorStatus
    amount_minor: int
    currency: str
    amount_captured_minor: int = 0
    decline_code: str | None = None
    message: str = ""


class RefundStatus(enum.StrEnum):
    """A processor-side refund's state."""

    SUCCEEDED = "succeeded"
    PENDING = "pending"
    FAILED = "failed"


@dataclass(frozen=True)
class ProcessorRefund:
    """The processor's view of one refund: its id, state and amount in minor units."""

    processor_reference: str
    status: RefundStatus
    amount_minor: int
    currency: str


class ProcessorError(Exception):
    """A failed processor call. ``code`` is the processor's error code or type
    (e.g. Stripe ``card_declined``); the message never contains credentials."""

    #: Whether the processor definitively did not move money for this call.
    definitely_not_charged: bool = True
    #: Whether the same call with the same idempotency key may be tried again.
    retryable: bool = False

    def __init__(self, message: str, *, code: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s


class Declined(ProcessorError):
    """The processor declined the charge (the payment method's issuer said no)."""


class PermanentProcessorError(ProcessorError):
    """The processor refused the request; retrying it unchanged will not help."""


class RetryableProcessorError(ProcessorError):
    """The processor did not process the request and may if asked again (same key)."""

    retryable = True


class AmbiguousProcessorError(ProcessorError):
    """The outcome is unknown: money may or may not have moved (timeout, reset, 5xx)."""

    definitely_not_charged = False


class PaymentProcessor(Protocol):
    """One processor account of one tenant (credentials inside, never in reprs)."""

    #: The processor's name in configuration and in the ledger: ``"stripe"``, ``"adyen"``.
    name: str

    async def create_charge(self, request: ChargeRequest) -> ProcessorPayment:
        """Create and confirm a payment for ``request`` (idempotency key = its attempt key).

        Returns the processor's payment (SUCCEEDED, REQUIRES_CAPTURE for manual
        capture, PROCESSING when the outcome follows asynchronously).
        Raises :class:`ProcessorError` subclasses as classified above.
        """
        ...

    async def capture(
        self, processor_reference: str, amount_minor: int, currency: str, idempotency_key: str
    ) -> ProcessorPayment:
        """Capture ``amount_minor`` (<= the authorized amount) of an authorized payment."""
        ...

    async def cancel(self, processor_reference: str, idempotency_key: str) -> ProcessorPayment:
        """Release an authorization that was not captured."""
        ...

    async def refund(
        self, processor_reference: str, amount_minor: int, currency: str, idempotency_key: str
    ) -> ProcessorRefund:
        """Refund ``amount_minor`` of a captured payment (several partial refunds allowed)."""
        ...

    async def lookup_charge(self, request: ChargeRequest) -> ProcessorPayment | None:
        """Find the processor-side payment of this attempt after an ambiguous answer.

        Returns None only when the processor definitively has no payment for the
        attempt's idempotency key; raises :class:`ProcessorError` when it cannot tell.
        """
        ...

    async def aclose(self) -> None:
        """Release the HTTP client."""
        ...
