-- A bot's version: bumped by every change of its spec, so that an update can say
-- which version it was made against (the API's ETag / If-Match) and two updates
-- of one bot are serialised instead of one silently undoing the other.
ALTER TABLE bots ADD COLUMN version bigint NOT NULL DEFAULT 1;
-- Events are pruned oldest first, by age and by count.
CREATE INDEX events_at ON events (at);
