"""What every provider module implements, and how failures are classified."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Protocol

from switchboard.notify.v1 import events_pb2


@dataclass(frozen=True)
class SendResult:
    """A provider accepted the message; ``provider_message_id`` is its id for it."""

    provider_message_id: str


class DeliveryError(Exception):
    """A failed send. ``retryable`` says whether another attempt may succeed;
    ``retry_after_s`` is the provider's requested wait, if it gave one.

    The message must never contain credentials.
    """

    retryable: bool = True

    def __init__(self, reason: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class RetryableDeliveryError(DeliveryError):
    """A transient failure: timeouts, connection errors, 4xx SMTP replies, 5xx/429 HTTP."""

    retryable = True


class PermanentDeliveryError(DeliveryError):
    """A failure another attempt cannot fix: bad recipient, rejected content, auth refused."""

    retryable = False


#: Reason prefix of a failure after which the provider may have acted anyway (a
#: timeout or reset after the request was sent, a 5xx): retrying it can
#: duplicate the message where the provider takes no idempotency key.
AMBIGUOUS_PREFIX = "ambiguous:"


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 section 10.2.3).

    Accepts delay-seconds (``"120"``) or an HTTP-date; a date in the past is 0.
    Returns ``None`` for a missing or unparseable value.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class Provider(Protocol):
    """Sends one delivery. Raises :class:`DeliveryError` subclasses on failure."""

    @property
    def name(self) -> str:
        """Short provider name recorded with each attempt, e.g. ``smtp``."""
        ...

    async def send(self, event: events_pb2.DeliveryRequested) -> SendResult:
        """Deliver ``event`` and return the provider's message id."""
        ...

    async def close(self) -> None:
        """Release connections and clients."""
        ...
