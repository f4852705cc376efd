-- What the health checker remembers per bot (backoff, failure streak), so that a
-- restarted controller does not forget a backoff. No foreign key: rows go with
-- the bot in the same transaction that deletes it.
CREATE TABLE bot_health (
    name        text PRIMARY KEY,
    record      jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
