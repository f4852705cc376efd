-- Scoped API tokens: what a token may do (read < operate < admin), when it was
-- last used and when it expires. Tokens made before scopes existed could do
-- everything: they become admin tokens, so that nobody is locked out.
ALTER TABLE api_tokens
    ADD COLUMN scope text NOT NULL DEFAULT 'admin' CHECK (scope IN ('read', 'operate', 'admin')),
    ADD COLUMN last_used_at timestamptz,
    ADD COLUMN expires_at timestamptz;
ALTER TABLE api_tokens ALTER COLUMN scope DROP DEFAULT;
