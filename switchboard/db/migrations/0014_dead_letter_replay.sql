-- Dead-letter replay and fallback chains (docs/providers.md, "Replaying dead letters").
--
-- A fallback chain link at position >= 1 is created only by the worker, when
-- the link before it fails for good (channels/delivery.py). Each position of
-- a notification's chain exists at most once, so a replayed link that fails
-- again can never start its next channel a second time. Position 0 is not
-- covered: ordinary (non-fallback) notifications have one delivery per
-- channel, all at position 0, and a chain's first link is written once, by
-- the gateway's accept statement. Creating the index fails with a unique
-- violation if a database already holds such duplicates; resolve them first.
CREATE UNIQUE INDEX deliveries_chain_link_key
    ON deliveries (notification_id, chain_position)
    WHERE chain_position > 0;

-- When the last DLQ replay put the delivery back. A replay gets a fresh
-- budget: the attempt limit counts from attempts_before_replay (0003) and the
-- age limit from this moment instead of the notification's accept time.
ALTER TABLE deliveries ADD COLUMN last_replayed_at timestamptz;
