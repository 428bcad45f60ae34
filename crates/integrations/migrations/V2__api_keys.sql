-- API keys for the HTTP API: only a SHA-256 hash of each key is stored.
CREATE TABLE api_keys (
    id          bigserial   PRIMARY KEY,
    name        text        NOT NULL,
    key_hash    bytea       NOT NULL UNIQUE,
    -- The key's first characters, to recognise it in listings.
    prefix      text        NOT NULL,
    scopes      text[]      NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    CONSTRAINT api_keys_scopes_valid CHECK (scopes <@ ARRAY['read', 'write', 'credentials', 'admin'])
);

CREATE UNIQUE INDEX api_keys_name_active ON api_keys (name) WHERE revoked_at IS NULL;
