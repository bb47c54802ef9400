"""What every provider module implements, and how failures are classified."""

from __future__ import annotations

from dataclasses import dataclass
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
