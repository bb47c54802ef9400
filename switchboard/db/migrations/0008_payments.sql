-- Payments: the payment (one per CreatePayment), its charge attempts, its
-- captures and refunds, and its append-only status history.
-- payments/store.py writes these tables (the gateway: accept; the payment
-- worker: attempts and outcomes); payments/state_machine.py holds the rules.
--
-- Amounts are bigint minor units of the payment's ISO 4217 currency.
-- What the database itself enforces:
--   * statuses are the state machine's names; amounts are positive;
--   * 0 <= refunded <= captured <= amount on every payment, and something is
--     captured exactly when the payment is SUCCEEDED;
--   * one open or done capture per payment (a FAILED one may be followed by another);
--   * an attempt's processor idempotency key is `{payment_id}_{attempt_no}`,
--     unique across all payments;
--   * the status history (payment_transitions) is append-only.
-- What it does not enforce: that the refunds not FAILED stay within the captured
-- amount. The gateway checks that under the payment's row lock (SELECT ... FOR
-- UPDATE) in the transaction that inserts the refund, so concurrent refunds
-- are serialized (payments/state_machine.check_refund).
--
-- Idempotency records of payment RPCs live in idempotency_keys with request_id
-- 'payments <request_id>': a notification request_id never contains a space
-- (1-128 of ASCII 0x21-0x7E, gateway/validation.py), so the two key spaces
-- cannot collide, and the relay's reaper expires both with one retention.
--
-- Changes are announced with pg_notify('switchboard_payment_status',
-- '<payment id>') in the changing transaction (WatchPayment); the PaymentCommand
-- for the payment worker goes through the outbox (topic '<prefix>payments.commands').

CREATE TABLE payments (
    id                    uuid PRIMARY KEY,
    tenant_id             uuid NOT NULL REFERENCES tenants (id),
    request_id            text NOT NULL,
    status                text NOT NULL DEFAULT 'requires_processing'
                          CHECK (status IN ('requires_processing', 'processing', 'requires_capture',
                                            'succeeded', 'failed', 'unknown', 'canceled')),
    amount_minor          bigint NOT NULL CHECK (amount_minor > 0),
    currency              text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    amount_captured_minor bigint NOT NULL DEFAULT 0,
    amount_refunded_minor bigint NOT NULL DEFAULT 0,
    capture_method        text NOT NULL CHECK (capture_method IN ('automatic', 'manual')),
    customer_reference    text NOT NULL DEFAULT '' CHECK (length(customer_reference) <= 128),
    customer_email        text NOT NULL DEFAULT '',
    customer_phone        text NOT NULL DEFAULT '',
    payment_method        text NOT NULL CHECK (length(payment_method) BETWEEN 1 AND 255),
    description           text NOT NULL DEFAULT '' CHECK (length(description) <= 1000),
    metadata              jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- The latest attempt's processor and its reference for the payment.
    processor             text NOT NULL DEFAULT '',
    processor_reference   text NOT NULL DEFAULT '',
    failure_code          text NOT NULL DEFAULT '',
    failure_message       text NOT NULL DEFAULT '',
    cancellation_reason   text NOT NULL DEFAULT '' CHECK (length(cancellation_reason) <= 500),
    cancel_requested_at   timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, id),
    CONSTRAINT payments_amounts CHECK (
        0 <= amount_refunded_minor
        AND amount_refunded_minor <= amount_captured_minor
        AND amount_captured_minor <= amount_minor),
    CONSTRAINT payments_captured_iff_succeeded CHECK ((status = 'succeeded') = (amount_captured_minor > 0))
);
-- ListPayments: newest first within a tenant, keyset pagination on (created_at, id).
CREATE INDEX payments_tenant_created_id_idx ON payments (tenant_id, created_at DESC, id DESC);

-- One charge attempt at a processor. The row is written (PENDING) BEFORE the
-- processor is called, so a crash mid-call leaves a PENDING attempt that the
-- janitor resolves by looking it up under its idempotency key.
CREATE TABLE payment_attempts (
    tenant_id           uuid NOT NULL,
    payment_id          uuid NOT NULL,
    attempt_no          integer NOT NULL CHECK (attempt_no >= 1),
    status              text NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'succeeded', 'failed', 'unknown')),
    processor           text NOT NULL CHECK (processor ~ '^[a-z0-9][a-z0-9_-]{0,31}$'),
    idempotency_key     text GENERATED ALWAYS AS (payment_id::text || '_' || attempt_no::text) STORED,
    processor_reference text NOT NULL DEFAULT '',
    failure_code        text NOT NULL DEFAULT '',
    failure_message     text NOT NULL DEFAULT '',
    -- When the janitor should next look an UNKNOWN (or stale PENDING) attempt up.
    next_lookup_at      timestamptz,
    started_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (payment_id, attempt_no),
    CONSTRAINT payment_attempts_idempotency_key UNIQUE (idempotency_key),
    FOREIGN KEY (tenant_id, payment_id) REFERENCES payments (tenant_id, id)
);
CREATE INDEX payment_attempts_lookup_idx ON payment_attempts (next_lookup_at)
    WHERE next_lookup_at IS NOT NULL;

-- One capture (CapturePayment). Its id is also its processor idempotency key.
CREATE TABLE payment_captures (
    id                  uuid PRIMARY KEY,
    tenant_id           uuid NOT NULL,
    payment_id          uuid NOT NULL,
    request_id          text NOT NULL,
    status              text NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'processing', 'succeeded', 'failed', 'unknown')),
    amount_minor        bigint NOT NULL CHECK (amount_minor > 0),
    processor_reference text NOT NULL DEFAULT '',
    failure_code        text NOT NULL DEFAULT '',
    failure_message     text NOT NULL DEFAULT '',
    next_lookup_at      timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (tenant_id, payment_id) REFERENCES payments (tenant_id, id)
);
CREATE INDEX payment_captures_payment_idx ON payment_captures (payment_id, created_at);
-- One capture per payment: at most one that is not FAILED.
CREATE UNIQUE INDEX payment_captures_one_open_idx ON payment_captures (payment_id) WHERE status <> 'failed';

-- One refund (RefundPayment). Its id is also its processor idempotency key.
CREATE TABLE payment_refunds (
    id                  uuid PRIMARY KEY,
    tenant_id           uuid NOT NULL,
    payment_id          uuid NOT NULL,
    request_id          text NOT NULL,
    status              text NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'processing', 'succeeded', 'failed', 'unknown')),
    amount_minor        bigint NOT NULL CHECK (amount_minor > 0),
    reason              text NOT NULL DEFAULT '' CHECK (length(reason) <= 500),
    processor_reference text NOT NULL DEFAULT '',
    failure_code        text NOT NULL DEFAULT '',
    failure_message     text NOT NULL DEFAULT '',
    next_lookup_at      timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (tenant_id, payment_id) REFERENCES payments (tenant_id, id)
);
CREATE INDEX payment_refunds_payment_idx ON payment_refunds (payment_id, created_at);

-- Every status change of a payment, oldest first by id. `from_status` is NULL
-- for the creation (cause 'created'); `cause` is a PaymentTrigger value.
CREATE TABLE payment_transitions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   uuid NOT NULL,
    payment_id  uuid NOT NULL,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    from_status text CHECK (from_status IN ('requires_processing', 'processing', 'requires_capture',
                                            'succeeded', 'failed', 'unknown', 'canceled')),
    to_status   text NOT NULL CHECK (to_status IN ('requires_processing', 'processing', 'requires_capture',
                                                   'succeeded', 'failed', 'unknown', 'canceled')),
    cause       text NOT NULL CHECK (cause ~ '^[a-z][a-z_]{0,63}$'),
    attempt_no  integer NOT NULL DEFAULT 0 CHECK (attempt_no >= 0),
    detail      text NOT NULL DEFAULT '' CHECK (length(detail) <= 1000),
    CHECK (from_status IS DISTINCT FROM to_status),
    FOREIGN KEY (tenant_id, payment_id) REFERENCES payments (tenant_id, id)
);
CREATE INDEX payment_transitions_payment_idx ON payment_transitions (payment_id, id);

CREATE FUNCTION payment_transitions_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'payment transitions are append-only: % on % is refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER payment_transitions_append_only BEFORE UPDATE OR DELETE ON payment_transitions
    FOR EACH ROW EXECUTE FUNCTION payment_transitions_refuse_change();
CREATE TRIGGER payment_transitions_no_truncate BEFORE TRUNCATE ON payment_transitions
    FOR EACH STATEMENT EXECUTE FUNCTION payment_transitions_refuse_change();
