-- The payment sweeper (payments/sweeper.py, run by the outbox relay): re-publishes a
-- PaymentCommand whose operation stays unfinished past SWITCHBOARD_PAYMENT_SWEEP_AFTER_S,
-- because the broker may lose messages it acknowledged (a memory-only broker restarting,
-- unclean leader election, retention expiry) and nothing else would ever send such a
-- command again: the janitor only looks after operations that were started.
--
-- A command row names the operation it asks for, so the sweeper can tell "its command
-- is still waiting in the outbox or was published a moment ago" (leave it) from "its
-- last command was published long ago and the operation never moved" (lost: sweep):
--   payment_operation_id = the payment id (CREATE, CANCEL), the capture id (CAPTURE)
--   or the refund id (REFUND); NULL for every other outbox row.
ALTER TABLE outbox ADD COLUMN payment_operation_id uuid;
CREATE INDEX outbox_payment_operation_idx ON outbox (payment_operation_id, published_at)
    WHERE payment_operation_id IS NOT NULL;

-- When the processor accepted the release of an authorization for later (Adyen answers
-- cancels "received" and reports the outcome by webhook). Such a cancel is in the
-- processor's hands, not lost: the sweeper leaves it (a cancel requested again later has
-- a newer cancel_requested_at, so an older value does not count).
ALTER TABLE payments ADD COLUMN cancel_accepted_at timestamptz;

-- What the sweeper scans: operations that no command, lease or lookup schedule covers.
CREATE INDEX payments_sweep_create_idx ON payments (updated_at) WHERE status = 'requires_processing';
CREATE INDEX payments_sweep_cancel_idx ON payments (updated_at)
    WHERE status = 'requires_capture' AND cancel_requested_at IS NOT NULL AND cancel_next_lookup_at IS NULL;
CREATE INDEX payment_captures_sweep_idx ON payment_captures (updated_at)
    WHERE status = 'pending' AND next_lookup_at IS NULL;
CREATE INDEX payment_refunds_sweep_idx ON payment_refunds (updated_at)
    WHERE status = 'pending' AND next_lookup_at IS NULL;
