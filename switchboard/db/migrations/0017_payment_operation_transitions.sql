-- The history of every payment operation: each status change of a charge attempt,
-- a capture and a refund, with its time, cause and attempt (issue "Payments", item 2:
-- "every transition recorded with time, cause and attempt"; refunds and captures
-- are their own records with their own states). payment_transitions (0008) keeps
-- the payment's own status history; this table keeps its operations'.
--
-- payments/store.py writes it in the transaction that changes the operation
-- (record_operation_transition, called by start_attempt / finish_attempt, the
-- capture and refund accept path, and payments/outcomes.move_operation), and
-- GetPayment shows it per attempt, capture and refund (oldest first).
--
--   kind       'attempt' (attempt_no >= 1, operation_id NULL) or 'capture' / 'refund'
--              (operation_id = the capture or refund id, attempt_no 0)
--   from       NULL for the creation (cause 'created'; 'migrated' for operations that
--              existed before this migration: their status as found, at updated_at)
--   cause      an OperationTrigger value of payments/state_machine.py ('started',
--              'succeeded', 'failed', 'ambiguous', 'retry_scheduled', 'resolved_*')
--
-- Append-only, like payment_transitions: UPDATE, DELETE and TRUNCATE are refused.

CREATE TABLE payment_operation_transitions (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id    uuid NOT NULL,
    payment_id   uuid NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('attempt', 'capture', 'refund')),
    attempt_no   integer NOT NULL DEFAULT 0,
    operation_id uuid,
    occurred_at  timestamptz NOT NULL DEFAULT now(),
    from_status  text CHECK (from_status IN ('pending', 'processing', 'succeeded', 'failed', 'unknown')),
    to_status    text NOT NULL CHECK (to_status IN ('pending', 'processing', 'succeeded', 'failed', 'unknown')),
    cause        text NOT NULL CHECK (cause ~ '^[a-z][a-z_]{0,63}$'),
    detail       text NOT NULL DEFAULT '' CHECK (length(detail) <= 1000),
    CHECK (from_status IS DISTINCT FROM to_status),
    CONSTRAINT payment_operation_transitions_identity CHECK (
        (kind = 'attempt' AND attempt_no >= 1 AND operation_id IS NULL)
        OR (kind <> 'attempt' AND attempt_no = 0 AND operation_id IS NOT NULL)),
    -- Attempts have no processing status; captures and refunds do.
    CHECK (kind <> 'attempt' OR 'processing' NOT IN (coalesce(from_status, ''), to_status)),
    FOREIGN KEY (tenant_id, payment_id) REFERENCES payments (tenant_id, id)
);
CREATE INDEX payment_operation_transitions_payment_idx ON payment_operation_transitions (payment_id, id);

CREATE TRIGGER payment_operation_transitions_append_only
    BEFORE UPDATE OR DELETE ON payment_operation_transitions
    FOR EACH ROW EXECUTE FUNCTION payment_transitions_refuse_change();
CREATE TRIGGER payment_operation_transitions_no_truncate BEFORE TRUNCATE ON payment_operation_transitions
    FOR EACH STATEMENT EXECUTE FUNCTION payment_transitions_refuse_change();

-- Operations that exist already start their history with the status they have now.
INSERT INTO payment_operation_transitions
       (tenant_id, payment_id, kind, attempt_no, operation_id, occurred_at, to_status, cause)
SELECT tenant_id, payment_id, 'attempt', attempt_no, NULL, updated_at, status, 'migrated'
  FROM payment_attempts
UNION ALL
SELECT tenant_id, payment_id, 'capture', 0, id, updated_at, status, 'migrated' FROM payment_captures
UNION ALL
SELECT tenant_id, payment_id, 'refund', 0, id, updated_at, status, 'migrated' FROM payment_refunds
ORDER BY 6;
