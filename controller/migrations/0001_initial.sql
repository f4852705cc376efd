-- Bots, their events (audit trail and bus), API tokens and fleet defaults.
CREATE TABLE bots (
    name          text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9-]{0,31}$'),
    spec          jsonb NOT NULL,
    desired       text NOT NULL CHECK (desired IN ('running', 'stopped')),
    state         text NOT NULL,
    state_since   timestamptz NOT NULL DEFAULT now(),
    state_reason  text NOT NULL DEFAULT '',
    generation    integer NOT NULL DEFAULT 1,
    restarts      integer NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- No foreign key to bots: a destroyed bot's history stays.
CREATE TABLE events (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    bot         text,
    kind        text NOT NULL,
    actor       text NOT NULL,
    from_state  text,
    to_state    text,
    reason      text NOT NULL DEFAULT '',
    data        jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX events_bot_id ON events (bot, id);

CREATE TABLE api_tokens (
    id            serial PRIMARY KEY,
    name          text NOT NULL UNIQUE,
    token_sha256  text NOT NULL UNIQUE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);

CREATE TABLE fleet_defaults (
    id     boolean PRIMARY KEY DEFAULT true CHECK (id),
    value  jsonb NOT NULL DEFAULT '{}'
);
INSERT INTO fleet_defaults (id, value) VALUES (true, '{}');
