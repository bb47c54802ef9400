-- The reaper deletes request_id records past the retention window, oldest first.
CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);
