-- Tenants, API keys, idempotency keys, notifications, deliveries, attempts,
-- and the transactional outbox.

CREATE TABLE tenants (
    id            uuid PRIMARY KEY,
    name          text NOT NULL UNIQUE CHECK (name ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    display_name  text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    disabled_at   timestamptz
);

-- Only a SHA-256 of the secret part is stored; the key id is the public handle.
CREATE TABLE api_keys (
    id            text PRIMARY KEY,
    tenant_id     uuid NOT NULL REFERENCES tenants (id),
    prefix        text NOT NULL,
    secret_sha256 bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz
);
CREATE INDEX api_keys_tenant_idx ON api_keys (tenant_id);

-- AIP-155 request ids: the first answer, replayed for the same tenant + key.
CREATE TABLE idempotency_keys (
    tenant_id     uuid NOT NULL REFERENCES tenants (id),
    request_id    text NOT NULL,
    request_hash  bytea NOT NULL,
    response      bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, request_id)
);

CREATE TABLE notifications (
    id            uuid PRIMARY KEY,
    tenant_id     uuid NOT NULL REFERENCES tenants (id),
    request_id    text NOT NULL,
    metadata      jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX notifications_tenant_created_idx ON notifications (tenant_id, created_at);

CREATE TABLE deliveries (
    id                  uuid PRIMARY KEY,
    notification_id     uuid NOT NULL REFERENCES notifications (id),
    tenant_id           uuid NOT NULL REFERENCES tenants (id),
    channel             text NOT NULL CHECK (channel IN ('email', 'sms', 'push')),
    recipient           text NOT NULL,
    status              text NOT NULL DEFAULT 'queued'
                        CHECK (status IN ('queued', 'sending', 'delivered', 'failed')),
    attempts            integer NOT NULL DEFAULT 0,
    provider            text NOT NULL DEFAULT '',
    provider_message_id text NOT NULL DEFAULT '',
    last_error          text NOT NULL DEFAULT '',
    -- A scheduled retry: messages for this delivery arriving earlier are duplicates.
    next_attempt_at     timestamptz,
    -- When an outbox row for it was last written; the sweeper re-publishes
    -- deliveries that stay unfinished long after this.
    last_enqueued_at    timestamptz NOT NULL DEFAULT now(),
    -- The serialized DeliveryRequested event, republished for retries.
    event               bytea NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX deliveries_notification_idx ON deliveries (notification_id);
CREATE INDEX deliveries_unfinished_idx ON deliveries (last_enqueued_at) WHERE status IN ('queued', 'sending');

CREATE TABLE delivery_attempts (
    delivery_id         uuid NOT NULL REFERENCES deliveries (id),
    attempt_number      integer NOT NULL,
    provider            text NOT NULL,
    outcome             text NOT NULL DEFAULT 'pending'
                        CHECK (outcome IN ('pending', 'delivered', 'retryable', 'permanent')),
    provider_message_id text NOT NULL DEFAULT '',
    error               text NOT NULL DEFAULT '',
    started_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz,
    PRIMARY KEY (delivery_id, attempt_number)
);

-- Transactional outbox: rows written with the business change, published by
-- the relay, marked published only after the broker acknowledged them.
CREATE TABLE outbox (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic         text NOT NULL,
    key           bytea NOT NULL,
    payload       bytea NOT NULL,
    -- The delivery a DeliveryRequested row is for (NULL for other events).
    delivery_id   uuid,
    created_at    timestamptz NOT NULL DEFAULT now(),
    available_at  timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX outbox_pending_idx ON outbox (available_at, id) WHERE published_at IS NULL;
CREATE INDEX outbox_pending_delivery_idx ON outbox (delivery_id) WHERE published_at IS NULL;
