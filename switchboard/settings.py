"""Process settings, read from ``SWITCHBOARD_*`` environment variables.

Every setting is listed in README.md ("Settings"). Durations carry their unit
in the name (``_ms``, ``_s``); sizes are counts unless named ``_bytes``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """All Switchboard settings.

    ``database_url`` and ``kafka_bootstrap`` may be left empty in ``switchboard
    dev`` / ``demo``, which then start embedded servers and fill them in.
    Every other process requires them.
    """

    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_", extra="ignore")

    # Where things run.
    database_url: SecretStr | None = Field(
        default=None, description="PostgreSQL DSN (postgresql://user:pass@host:port/db)"
    )
    kafka_bootstrap: str | None = Field(default=None, description="Kafka bootstrap servers, host:port[,...]")
    grpc_addr: str = Field(default="127.0.0.1:50051", description="gRPC listen address host:port")
    webhook_addr: str = Field(
        default="127.0.0.1:8081", description="processor webhook HTTP listen address host:port"
    )
    gateway_processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="gateway processes sharing the gRPC port (SO_REUSEPORT), forked at start",
    )
    data_dir: Path = Field(
        default=Path(".switchboard"), description="dev stack data (PostgreSQL, Maildir, sandbox)"
    )

    # Secrets.
    admin_token: SecretStr | None = Field(
        default=None,
        description="operator token for TenantAdminService (unset: admin API refuses every call)",
    )
    master_key: SecretStr | None = Field(
        default=None,
        description="keys sealing provider secrets: 'id:base64(32 bytes)[,old-id:base64,...]', current first",
    )

    default_providers: bool = Field(
        default=False,
        description="tenants without a provider configuration use the SMTP_* settings and the sandbox",
    )

    # Provider cache.
    provider_cache_max_tenants: int = Field(default=200, ge=1)
    provider_cache_idle_ttl_s: float = Field(default=3600.0, gt=0, description="evict after this long unused")

    # PostgreSQL pool.
    db_pool_min_size: int = Field(default=2, ge=1)
    db_pool_max_size: int = Field(default=10, ge=1)
    db_command_timeout_s: float = Field(default=10.0, gt=0)
    db_write_concurrency: int = Field(
        default=4,
        ge=1,
        description="accept statements in flight per gateway process (group commit)",
    )

    # Kafka.
    kafka_topic_prefix: str = Field(
        default="", description="prefix for every topic name (shared clusters, tests)"
    )
    kafka_partitions: int = Field(default=3, ge=1, description="partitions of topics created at start")
    kafka_replication_factor: int = Field(default=1, ge=1)
    kafka_idempotence: bool = Field(
        default=True, description="producer idempotence; off for brokers without InitProducerId (Tansu)"
    )
    kafka_linger_ms: int = Field(default=5, ge=0)
    kafka_request_timeout_ms: int = Field(default=10_000, ge=100)

    # Idempotency keys (AIP-155 request_id).
    idempotency_retention_s: float = Field(
        default=86_400.0, gt=0, description="how long a request_id is remembered; the relay reaps older ones"
    )

    # Outbox relay.
    relay_batch_size: int = Field(default=500, ge=1, le=10_000)
    relay_pipeline_depth: int = Field(
        default=2,
        ge=1,
        le=8,
        description="outbox batches in flight (acks and commits overlap the next claim)",
    )
    relay_poll_interval_ms: int = Field(default=200, ge=1, description="poll when no NOTIFY arrives")
    relay_error_backoff_ms: int = Field(default=500, ge=1)
    relay_sweep_interval_s: float = Field(
        default=10.0, gt=0, description="how often the sweepers run (deliveries and payment commands)"
    )
    relay_sweep_after_s: float = Field(
        default=120.0, gt=0, description="re-publish deliveries unfinished this long after their last publish"
    )
    payment_sweep_after_s: float = Field(
        default=120.0,
        gt=0,
        description="re-publish a PaymentCommand whose operation is unfinished this long after its publish",
    )

    # Channel workers.
    worker_channels: str = Field(default="email,sms,push", description="channels a worker process consumes")
    worker_max_attempts: int = Field(
        default=5, ge=1, description="default attempts per delivery (per tenant: limits)"
    )
    worker_max_age_s: float = Field(
        default=86_400.0,
        gt=0,
        description="default age after which a delivery is not retried (per tenant: limits)",
    )
    worker_retry_base_ms: int = Field(default=1_000, ge=1)
    worker_retry_max_ms: int = Field(default=300_000, ge=1)
    worker_provider_timeout_s: float = Field(default=15.0, gt=0)
    worker_fetch_max_wait_ms: int = Field(
        default=50, ge=1, description="longest a worker's fetch waits at the broker for new messages"
    )
    worker_max_in_flight: int = Field(
        default=1_000,
        ge=1,
        description=(
            "records a channel worker holds (fetched, outcome not recorded); every partition paused beyond"
        ),
    )
    worker_commit_interval_ms: int = Field(
        default=200,
        ge=0,
        description=(
            "shortest time between two offset commits of a busy channel worker (0: after every poll);"
            " outcomes are recorded before their offsets are committed, so a crash only redelivers"
            " events the idempotent consumer skips"
        ),
    )
    worker_max_in_flight_per_tenant: int = Field(
        default=100,
        ge=1,
        description=(
            "records one tenant's lane (partition + tenant) holds in a channel worker; beyond it that"
            " partition is paused until the lane is down to half"
        ),
    )

    # Payment worker and janitor (payments/execution.py, docs/payments.md "Execution").
    payment_lookup_schedule_s: str = Field(
        default="300,3600,86400",
        pattern=r"^\s*\d+(\.\d+)?\s*(,\s*\d+(\.\d+)?\s*)*$",
        description="waits (s) before the 1st, 2nd, ... lookup of an UNKNOWN operation; the last repeats",
    )
    payment_lookup_after_s: float = Field(
        default=60.0,
        gt=0,
        description="lease of a processor call in flight; must exceed the processor timeout (30 s)",
    )
    payment_retry_max_sends: int = Field(
        default=3, ge=1, description="sends of one request on 'not processed'"
    )
    payment_retry_base_ms: int = Field(default=200, ge=1)
    payment_retry_max_ms: int = Field(default=2_000, ge=1, description="longest in-lane wait between sends")
    payment_breaker_failure_threshold: int = Field(default=5, ge=1)
    payment_breaker_cool_down_s: float = Field(default=30.0, gt=0)
    payment_breaker_wait_max_s: float = Field(
        default=900.0, gt=0, description="a payment waits this long for an open breaker, then is tried anyway"
    )
    payment_janitor_interval_s: float = Field(default=10.0, gt=0)
    payment_janitor_batch_size: int = Field(default=100, ge=1, le=10_000)

    # Signed status callbacks (dispatched by the relay process).
    callback_batch_size: int = Field(default=100, ge=1)
    callback_max_attempts: int = Field(default=10, ge=1)
    callback_retry_base_s: float = Field(default=1.0, gt=0)
    callback_retry_max_s: float = Field(default=3600.0, gt=0)
    callback_timeout_s: float = Field(default=10.0, gt=0)
    callback_poll_interval_ms: int = Field(default=500, ge=1)
    callback_max_concurrency: int = Field(default=16, ge=1)

    # Default providers (tenants without their own configuration).
    smtp_host: str = Field(default="127.0.0.1")
    smtp_port: int = Field(default=2525, ge=1, le=65535)
    smtp_from: str = Field(default="Switchboard <switchboard@localhost>")
    sandbox_dir: Path | None = Field(default=None, description="sandbox SMS/push JSON-lines folder")

    # Embedded dev stack ports.
    dev_postgres_port: int = Field(default=54329, ge=1, le=65535)
    dev_kafka_port: int = Field(default=19092, ge=1, le=65535)
    dev_twilio_port: int = Field(default=18081, ge=1, le=65535, description="the dev stack's fake Twilio")
    dev_fcm_port: int = Field(default=18082, ge=1, le=65535, description="the dev stack's fake FCM + OAuth2")
    dev_stripe_port: int = Field(default=18083, ge=1, le=65535, description="the dev stack's fake Stripe")

    # Shutdown.
    shutdown_grace_s: float = Field(
        default=10.0,
        gt=0,
        description="drain deadline after SIGTERM; a second signal or the deadline forces exit",
    )

    # Logging.
    log_level: str = Field(default="info")
    log_json: bool = Field(default=False, description="JSON log lines instead of console")

    def require_database_url(self) -> str:
        """Return the DSN or raise ``RuntimeError`` naming the missing setting."""
        if self.database_url is None:
            raise RuntimeError("SWITCHBOARD_DATABASE_URL is not set")
        return self.database_url.get_secret_value()

    def require_kafka_bootstrap(self) -> str:
        """Return the bootstrap servers or raise ``RuntimeError`` naming the missing setting."""
        if not self.kafka_bootstrap:
            raise RuntimeError("SWITCHBOARD_KAFKA_BOOTSTRAP is not set")
        return self.kafka_bootstrap

    def resolved_sandbox_dir(self) -> Path:
        """The sandbox folder: ``sandbox_dir`` or ``<data_dir>/sandbox``."""
        return self.sandbox_dir if self.sandbox_dir is not None else self.data_dir / "sandbox"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
