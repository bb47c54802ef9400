-- Payment execution: per-tenant routing rules, and the janitor's bookkeeping.
-- payments/routing.py reads and writes payment_routes (`switchboard payments
-- routes set|show|clear`); payments/execution.py and payments/janitor.py use
-- the lookup columns. docs/payments.md, "Execution", has the rules.
--
-- A routing rule sends the payments it matches (currency, amount range in
-- minor units, payment-method prefix; an empty/NULL condition matches
-- anything) to an ordered list of processors. Rules are tried in `position`
-- order and the first match wins; a tenant without a matching rule uses its
-- processors in configuration priority order.

CREATE TABLE payment_routes (
    tenant_id             uuid NOT NULL REFERENCES tenants (id),
    position              integer NOT NULL CHECK (position BETWEEN 1 AND 1000),
    currency              text CHECK (currency ~ '^[A-Z]{3}$'),
    min_amount_minor      bigint CHECK (min_amount_minor >= 1),
    max_amount_minor      bigint CHECK (max_amount_minor >= 1),
    payment_method_prefix text NOT NULL DEFAULT '' CHECK (length(payment_method_prefix) <= 255),
    processors            text[] NOT NULL
                          CHECK (cardinality(processors) BETWEEN 1 AND 16
                                 AND array_to_string(processors, ',')
                                     ~ '^[a-z0-9][a-z0-9_-]{0,31}(,[a-z0-9][a-z0-9_-]{0,31})*$'),
    created_at            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, position),
    CONSTRAINT payment_routes_amount_range CHECK (
        min_amount_minor IS NULL OR max_amount_minor IS NULL OR min_amount_minor <= max_amount_minor)
);

-- How many times the janitor has looked an operation up without an answer:
-- the index into SWITCHBOARD_PAYMENT_LOOKUP_SCHEDULE_S of the next wait.
ALTER TABLE payment_attempts ADD COLUMN lookups integer NOT NULL DEFAULT 0 CHECK (lookups >= 0);
-- How many requests carrying the attempt's key may have reached the processor
-- (counted, and committed, BEFORE each send or lookup). 0 proves the attempt
-- was never sent: only then may an error that says "not processed" end it
-- FAILED with a failover; otherwise it goes to the janitor.
ALTER TABLE payment_attempts ADD COLUMN sends integer NOT NULL DEFAULT 0 CHECK (sends >= 0);
ALTER TABLE payment_captures ADD COLUMN lookups integer NOT NULL DEFAULT 0 CHECK (lookups >= 0);
ALTER TABLE payment_refunds ADD COLUMN lookups integer NOT NULL DEFAULT 0 CHECK (lookups >= 0);

-- The release of an authorization (CancelPayment of a REQUIRES_CAPTURE
-- payment) has no row of its own: while it is in flight or waits for a retry
-- with its idempotency key, the payment carries when to send it again.
ALTER TABLE payments ADD COLUMN cancel_next_lookup_at timestamptz;
ALTER TABLE payments ADD COLUMN cancel_lookups integer NOT NULL DEFAULT 0 CHECK (cancel_lookups >= 0);

CREATE INDEX payment_captures_lookup_idx ON payment_captures (next_lookup_at)
    WHERE next_lookup_at IS NOT NULL;
CREATE INDEX payment_refunds_lookup_idx ON payment_refunds (next_lookup_at)
    WHERE next_lookup_at IS NOT NULL;
CREATE INDEX payments_cancel_lookup_idx ON payments (cancel_next_lookup_at)
    WHERE cancel_next_lookup_at IS NOT NULL;
