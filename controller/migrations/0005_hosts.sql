-- Several hosts on one database. A bot's `host` is where the operator wants it;
-- `held_by` is the host whose controller may have a process of it (null: none
-- anywhere). A controller starts a bot only once it holds it, and lets go of one
-- only after its process is gone, so one token is never polled from two hosts.
-- Bots from before hosts have no host: the first controller to look adopts them.
ALTER TABLE bots
    ADD COLUMN host text,
    ADD COLUMN held_by text;
CREATE INDEX bots_held_by ON bots (held_by);

-- Each controller's heartbeat (the database's clock): when it was last seen.
CREATE TABLE hosts (
    name        text PRIMARY KEY,
    started_at  timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now(),
    api_url     text NOT NULL DEFAULT ''
);

-- Every controller LISTENs on `tgfleet_changes`: a change made through any host's API
-- reaches the host that runs the bot at once instead of at its next poll.
CREATE FUNCTION tgfleet_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tgfleet_changes', TG_TABLE_NAME);
    RETURN NULL;
END
$$;
CREATE TRIGGER bots_changed AFTER INSERT OR UPDATE OR DELETE ON bots
    FOR EACH STATEMENT EXECUTE FUNCTION tgfleet_notify_change();
CREATE TRIGGER fleet_defaults_changed AFTER UPDATE ON fleet_defaults
    FOR EACH STATEMENT EXECUTE FUNCTION tgfleet_notify_change();
