-- Processor webhooks received (payments/webhooks.py; docs/payments.md, "Processor webhooks").
--
-- One row per event delivered to POST /webhooks/<processor>/<tenant id>:
--   * verified = true: the signature checked out under the tenant's secrets.
--     (tenant, processor, event_id) is unique among verified rows: a repeated
--     delivery only bumps `deliveries` and `last_received_at` and changes
--     nothing else. The row is written in the same transaction as the change
--     the event causes (transition, journal, PaymentEvent), so "recorded" and
--     "applied" commit together.
--   * verified = false: a delivery whose signature did not verify, kept for
--     audit (outcome 'rejected'; `detail` says why, never a secret). Its
--     event_id is only what the body claims, so it takes no part in
--     deduplication: a forged delivery can never make the genuine event look
--     like a repeat.
-- Stripe events are stored without `client_secret` (https://docs.stripe.com/api/payment_intents/object:
-- it must not be stored or logged); Adyen items as received (their
-- hmacSignature is a MAC, not a key).

CREATE TABLE webhook_events (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id        uuid NOT NULL REFERENCES tenants (id),
    processor        text NOT NULL CHECK (processor ~ '^[a-z0-9][a-z0-9_-]{0,31}$'),
    -- Stripe: the event id (evt_...); Adyen: '<eventCode>:<pspReference>:<success>'; '' when none.
    event_id         text NOT NULL DEFAULT '' CHECK (length(event_id) <= 255),
    event_type       text NOT NULL DEFAULT '' CHECK (length(event_type) <= 255),
    verified         boolean NOT NULL,
    received_at      timestamptz NOT NULL DEFAULT now(),
    last_received_at timestamptz NOT NULL DEFAULT now(),
    deliveries       integer NOT NULL DEFAULT 1 CHECK (deliveries >= 1),
    -- The parsed body (Stripe: the Event; Adyen: one NotificationRequestItem); NULL when not JSON.
    payload          jsonb,
    payment_id       uuid,
    outcome          text NOT NULL CHECK (outcome IN ('applied', 'already_applied', 'lookup_scheduled',
                                                      'unmatched', 'ignored', 'needs_operator', 'rejected')),
    detail           text NOT NULL DEFAULT '' CHECK (length(detail) <= 1000),
    FOREIGN KEY (tenant_id, payment_id) REFERENCES payments (tenant_id, id)
);
CREATE UNIQUE INDEX webhook_events_dedup_idx ON webhook_events (tenant_id, processor, event_id) WHERE verified;
CREATE INDEX webhook_events_tenant_received_idx ON webhook_events (tenant_id, received_at DESC);
CREATE INDEX webhook_events_payment_idx ON webhook_events (payment_id) WHERE payment_id IS NOT NULL;

-- Finding the payment an event is about: by the processor's reference of the payment, of an
-- attempt, of a capture or of a refund (our own ids and attempt keys are already indexed).
CREATE INDEX payments_processor_reference_idx ON payments (processor_reference);
CREATE INDEX payment_attempts_processor_reference_idx ON payment_attempts (processor_reference);
CREATE INDEX payment_captures_processor_reference_idx ON payment_captures (processor_reference);
CREATE INDEX payment_refunds_processor_reference_idx ON payment_refunds (processor_reference);
