-- AIP-155 request ids of TenantAdminService (gateway/admin_idempotency.py,
-- docs/idempotency.md). The admin API has one caller, the operator, so its
-- keys form one key space of their own: no tenant column (CreateTenant has no
-- tenant yet), and no overlap with the tenants' keys in `idempotency_keys`.
--
-- `request_hash` is SHA-256 over the method and the request, or, for requests
-- that carry provider or processor secrets, HMAC-SHA256 under a subkey of the
-- master key named by `hash_key_id` (an unkeyed hash of a low-entropy password
-- could be brute-forced from this table). `response` is the first answer as a
-- google.rpc.Status (OK with the response packed, or the error); it never
-- holds a secret: CreateApiKey and SetStatusCallback answers are stored with
-- their secret removed. An empty `response` is never visible to others: it is
-- filled in the transaction that inserted the key.
CREATE TABLE admin_idempotency_keys (
    request_id    text PRIMARY KEY CHECK (length(request_id) BETWEEN 1 AND 128),
    request_hash  bytea NOT NULL CHECK (octet_length(request_hash) = 32),
    hash_key_id   text,
    response      bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- The relay's reaper deletes records past the retention window, oldest first.
CREATE INDEX admin_idempotency_keys_created_idx ON admin_idempotency_keys (created_at);
