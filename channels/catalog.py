"""Channel names, their proto enum values and their Kafka topics."""

from __future__ import annotations

from typing import Final

from switchboard.notify.v1 import notify_pb2

#: Channel name (as stored in PostgreSQL and used in topic names) by proto enum value.
CHANNEL_NAMES: Final[dict[int, str]] = {
    notify_pb2.CHANNEL_EMAIL: "email",
    notify_pb2.CHANNEL_SMS: "sms",
    notify_pb2.CHANNEL_PUSH: "push",
}
#: Proto enum value by channel name.
CHANNEL_VALUES: Final[dict[str, int]] = {name: value for value, name in CHANNEL_NAMES.items()}
#: Every concrete channel, in the order CHANNEL_ALL expands to.
ALL_CHANNELS: Final[tuple[str, ...]] = ("email", "sms", "push")


def delivery_topic(channel: str, prefix: str = "") -> str:
    """The topic DeliveryRequested events for ``channel`` go to: ``<prefix>notify.<channel>``."""
    return f"{prefix}notify.{channel}"


def dead_letter_topic(channel: str, prefix: str = "") -> str:
    """The dead-letter topic for ``channel``: ``<prefix>notify.<channel>.dlq``."""
    return f"{prefix}notify.{channel}.dlq"


def payment_commands_topic(prefix: str = "") -> str:
    """The topic of PaymentCommand events for the payment worker: ``<prefix>payments.commands``."""
    return f"{prefix}payments.commands"


def payment_events_topic(prefix: str = "") -> str:
    """The topic of PaymentEvent messages (payment state changes): ``<prefix>payments.events``."""
    return f"{prefix}payments.events"


def all_topics(prefix: str = "") -> list[str]:
    """Every topic Switchboard uses, for creation at start."""
    notify = [t for c in ALL_CHANNELS for t in (delivery_topic(c, prefix), dead_letter_topic(c, prefix))]
    return [*notify, payment_commands_topic(prefix), payment_events_topic(prefix)]
