-- Payment notification rules (payments/notification_rules.py, payments/event_notifier.py,
-- `switchboard payments notify-rules set|list|delete`): per tenant, "when a payment event
-- of this type is published on payments.events, send the customer this notification".
--
-- Templates use Python string.Template placeholders ($amount, $currency, ...); the
-- placeholders and the per-channel requirements are checked in Python before a rule is
-- stored (validate_rule). The rendered notification is accepted through the normal
-- notification write path with request_id 'payment-rule:<rule id>:event:<event id>', so
-- a redelivered event replays its idempotency record and never sends twice.
--
-- Length limits mirror the notification limits of gateway/validation.py (email subject
-- 998 characters, RFC 5322; bodies 262144 bytes; SMS 1600 characters, Twilio; push
-- title 256 and body 2048 characters).

CREATE TABLE payment_notification_rules (
    id             uuid PRIMARY KEY,
    tenant_id      uuid NOT NULL REFERENCES tenants (id),
    -- the tenant's handle for the rule; `set` with an existing name replaces that rule (same id)
    name           text NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    -- a PaymentEvent.event_type, e.g. 'payment.succeeded'
    event_type     text NOT NULL CHECK (event_type ~ '^payment\.[a-z_]{1,32}$'),
    -- the channels to send on, in email, sms, push order, no duplicates
    channels       text[] NOT NULL
        CHECK (cardinality(channels) BETWEEN 1 AND 3
               AND channels <@ ARRAY['email', 'sms', 'push']::text[]),
    email_subject  text NOT NULL DEFAULT '' CHECK (length(email_subject) <= 998),
    email_text     text NOT NULL DEFAULT '' CHECK (octet_length(email_text) <= 262144),
    email_html     text NOT NULL DEFAULT '' CHECK (octet_length(email_html) <= 262144),
    sms_text       text NOT NULL DEFAULT '' CHECK (length(sms_text) <= 1600),
    push_title     text NOT NULL DEFAULT '' CHECK (length(push_title) <= 256),
    push_body      text NOT NULL DEFAULT '' CHECK (length(push_body) <= 2048),
    enabled        boolean NOT NULL DEFAULT true,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);

-- The notifier's lookup: a tenant's enabled rules for one event type.
CREATE INDEX payment_notification_rules_event_idx
    ON payment_notification_rules (tenant_id, event_type) WHERE enabled;
