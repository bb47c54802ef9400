-- Status callbacks: per tenant an HTTPS endpoint and the secret signing what
-- is POSTed to it, and the queue of status-change events waiting to be POSTed
-- (channels/callbacks.py).

-- One callback endpoint per tenant. `signing_secret` is the shared HMAC-SHA256
-- key (32 random bytes), stored in clear: the dispatcher needs it to sign.
-- While a secret is being rotated, the old one keeps signing next to the new
-- one (two v1= entries) until `previous_secret_expires_at`.
CREATE TABLE tenant_callbacks (
    tenant_id                  uuid PRIMARY KEY REFERENCES tenants (id),
    url                        text NOT NULL CHECK (url ~* '^https?://' AND length(url) <= 2048),
    signing_secret             bytea NOT NULL CHECK (octet_length(signing_secret) = 32),
    previous_signing_secret    bytea CHECK (octet_length(previous_signing_secret) = 32),
    previous_secret_expires_at timestamptz,
    created_at                 timestamptz NOT NULL DEFAULT now(),
    updated_at                 timestamptz NOT NULL DEFAULT now()
);

-- One row per status-change event, written in the status change's own
-- transaction. A row is pending while `delivered_at` and `given_up_at` are
-- both NULL; a dispatcher claims a due row by pushing `next_attempt_at` one
-- lease ahead (and counting the attempt), POSTs it, then records the outcome:
-- `delivered_at` on 2xx, otherwise a backoff in `next_attempt_at`, or
-- `given_up_at` once the attempts are spent. `delivery_id` has no foreign key
-- on purpose: this queue never constrains or locks the delivery tables.
CREATE TABLE callback_deliveries (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id       uuid NOT NULL REFERENCES tenants (id),
    delivery_id     uuid NOT NULL,
    payload         jsonb NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    given_up_at     timestamptz,
    last_error      text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX callback_deliveries_due_idx ON callback_deliveries (next_attempt_at)
    WHERE delivered_at IS NULL AND given_up_at IS NULL;
