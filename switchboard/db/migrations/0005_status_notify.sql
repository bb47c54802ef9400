-- ListNotifications (newest first, keyset pagination on (created_at, id)):
-- an index matching ORDER BY created_at DESC, id DESC within a tenant, so a
-- page is one index range scan. It serves everything the (tenant_id,
-- created_at) index served, which it replaces.
--
-- Delivery status changes are announced with
-- pg_notify('switchboard_delivery_status', '<notification id>') in their own
-- transactions (channels/delivery.py); NOTIFY needs no schema.
--
-- Plain CREATE INDEX (migrations run in a transaction) blocks writes to
-- notifications while it builds; on a large table create it beforehand with
-- CREATE INDEX CONCURRENTLY under the same name and this becomes a no-op.
CREATE INDEX IF NOT EXISTS notifications_tenant_created_id_idx
    ON notifications (tenant_id, created_at DESC, id DESC);
DROP INDEX IF EXISTS notifications_tenant_created_idx;
