-- Failure handling: per-replay attempt budgets, fallback chains, dead letters
-- and invalid FCM registration tokens.

ALTER TABLE deliveries
    -- Attempts made before the last DLQ replay: a replay gets a fresh budget.
    ADD COLUMN attempts_before_replay integer NOT NULL DEFAULT 0,
    ADD COLUMN replays                integer NOT NULL DEFAULT 0,
    -- 0 for ordinary deliveries; 0, 1, 2 ... along a fallback chain.
    ADD COLUMN chain_position         integer NOT NULL DEFAULT 0;

ALTER TABLE notifications
    -- For fallback notifications: the ordered channels, the normalized
    -- recipient per channel and the request, to build the next delivery.
    ADD COLUMN fallback_channels text[] NOT NULL DEFAULT '{}',
    ADD COLUMN recipients        jsonb NOT NULL DEFAULT '{}'::jsonb,
    ADD COLUMN request           bytea;

-- One row per delivery that ended FAILED (the DLQ event went to Kafka through
-- the outbox as well); `switchboard dlq list|replay` work from here.
CREATE TABLE dead_letters (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id      uuid NOT NULL REFERENCES deliveries (id),
    tenant_id        uuid NOT NULL REFERENCES tenants (id),
    channel          text NOT NULL,
    reason           text NOT NULL,
    attempts         integer NOT NULL,
    dead_lettered_at timestamptz NOT NULL DEFAULT now(),
    replayed_at      timestamptz
);
CREATE INDEX dead_letters_pending_idx ON dead_letters (dead_lettered_at) WHERE replayed_at IS NULL;

-- FCM registration tokens FCM called UNREGISTERED / SENDER_ID_MISMATCH /
-- INVALID_ARGUMENT: later sends to them fail fast without calling FCM.
CREATE TABLE invalid_push_tokens (
    tenant_id   uuid NOT NULL REFERENCES tenants (id),
    token       text NOT NULL,
    reason      text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, token)
);
