"""Kafka clients (aiokafka) configured from settings, and topic creation."""

from __future__ import annotations

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from switchboard.settings import Settings

log = structlog.get_logger(__name__)

#: Kafka error code TOPIC_ALREADY_EXISTS (Kafka protocol guide, error codes).
TOPIC_ALREADY_EXISTS = 36


def make_producer(settings: Settings) -> AIOKafkaProducer:
    """A producer with ``acks=all`` and idempotence per ``settings.kafka_idempotence``.

    Idempotence needs the broker's InitProducerId, which the embedded Tansu
    broker lacks; it stays on for real Kafka.
    """
    return AIOKafkaProducer(
        bootstrap_servers=settings.require_kafka_bootstrap(),
        acks="all",
        enable_idempotence=settings.kafka_idempotence,
        linger_ms=settings.kafka_linger_ms,
        request_timeout_ms=settings.kafka_request_timeout_ms,
        max_batch_size=1024 * 1024,
    )


async def ensure_topics(settings: Settings, topics: list[str]) -> list[str]:
    """Create the missing ``topics`` with ``kafka_partitions`` partitions; return those created.

    Existing topics are left as they are. Raises aiokafka's connection errors
    when the broker cannot be reached.
    """
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.require_kafka_bootstrap(),
        request_timeout_ms=settings.kafka_request_timeout_ms,
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if not missing:
            return []
        response = await admin.create_topics(
            [NewTopic(t, settings.kafka_partitions, settings.kafka_replication_factor) for t in missing]
        )
        created = []
        for topic, code, *_ in response.topic_errors:
            if code == 0:
                created.append(topic)
            elif code != TOPIC_ALREADY_EXISTS:
                raise RuntimeError(f"cannot create topic {topic}: Kafka error code {code}")
        if created:
            log.info("topics created", topics=created, partitions=settings.kafka_partitions)
        return created
    finally:
        await admin.close()
