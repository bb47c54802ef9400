-- Tenant limits, provider configurations (secrets sealed with AES-256-GCM),
-- master-key canaries, and change notifications for the provider cache.

ALTER TABLE tenants
    ADD COLUMN max_delivery_attempts    integer NOT NULL DEFAULT 0 CHECK (max_delivery_attempts >= 0),
    ADD COLUMN max_delivery_age_seconds integer NOT NULL DEFAULT 0 CHECK (max_delivery_age_seconds >= 0),
    ADD COLUMN requests_per_second      integer NOT NULL DEFAULT 0 CHECK (requests_per_second >= 0),
    ADD COLUMN burst                    integer NOT NULL DEFAULT 0 CHECK (burst >= 0),
    ADD COLUMN updated_at               timestamptz NOT NULL DEFAULT now();

CREATE INDEX tenants_created_idx ON tenants (created_at, id);

-- One provider per tenant and channel. `settings` holds the non-secret fields;
-- the secret fields are one JSON object sealed with AES-256-GCM under the
-- master key `key_id`, with "<tenant id>/<channel>" as associated data.
CREATE TABLE provider_configs (
    tenant_id          uuid NOT NULL REFERENCES tenants (id),
    channel            text NOT NULL CHECK (channel IN ('email', 'sms', 'push')),
    provider           text NOT NULL CHECK (provider IN ('smtp', 'brevo', 'two_factor', 'twilio', 'fcm')),
    settings           jsonb NOT NULL DEFAULT '{}'::jsonb,
    secret_fields      text[] NOT NULL DEFAULT '{}',
    key_id             text NOT NULL,
    nonce              bytea NOT NULL,
    ciphertext         bytea NOT NULL,
    secret_fingerprint text NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, channel)
);
CREATE INDEX provider_configs_key_idx ON provider_configs (key_id);

-- A known plaintext sealed under each master key: a wrong key is caught at start.
CREATE TABLE master_key_canaries (
    key_id     text PRIMARY KEY,
    nonce      bytea NOT NULL,
    ciphertext bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
