-- Payment processor configurations per tenant (Stripe, Adyen), set through
-- TenantAdminService/SetProcessorConfig. A table of their own rather than
-- more rows in provider_configs: they are keyed by processor, not by
-- notification channel, a tenant may have several (failover by `priority`),
-- and they carry webhook verification secrets.
--
-- `settings` holds the non-secret fields; the secret fields (API key, webhook
-- secrets / HMAC keys) are one JSON object sealed with AES-256-GCM under the
-- master key `key_id`, with "<tenant id>/processor:<processor>" as associated
-- data, so a ciphertext does not open for another tenant or processor (nor as
-- a provider_configs secret, whose associated data is "<tenant id>/<channel>").
-- Master key rotation re-encrypts these rows too (tenants/master_keys.py).
CREATE TABLE processor_configs (
    tenant_id                   uuid NOT NULL REFERENCES tenants (id),
    processor                   text NOT NULL CHECK (processor IN ('stripe', 'adyen')),
    priority                    integer NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 1000),
    settings                    jsonb NOT NULL DEFAULT '{}'::jsonb,
    secret_fields               text[] NOT NULL DEFAULT '{}',
    key_id                      text NOT NULL,
    nonce                       bytea NOT NULL,
    ciphertext                  bytea NOT NULL,
    secret_fingerprint          text NOT NULL,
    webhook_secret_fingerprints text[] NOT NULL DEFAULT '{}',
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, processor)
);
CREATE INDEX processor_configs_key_idx ON processor_configs (key_id);
