-- Users' third-party integrations. Tokens are AES-256-GCM ciphertexts
-- (nonce || ciphertext || tag) under the key named by key_id.
CREATE TABLE integrations (
    id                  bigserial PRIMARY KEY,
    user_id             text        NOT NULL,
    provider            text        NOT NULL,
    account_id          text        NOT NULL,
    status              text        NOT NULL DEFAULT 'connected'
                        CHECK (status IN ('connected', 'expired', 'error', 'revoked')),
    scopes              text[]      NOT NULL DEFAULT '{}',
    token_type          text        NOT NULL DEFAULT 'Bearer',
    access_token        bytea       NOT NULL,
    refresh_token       bytea,
    key_id              text        NOT NULL,
    expires_at          timestamptz,
    last_refresh_at     timestamptz,
    refresh_failures    integer     NOT NULL DEFAULT 0,
    next_refresh_at     timestamptz,
    last_error          text,
    -- Incremented by every completed refresh attempt: callers that waited
    -- for another's refresh see it moved and take that result.
    refresh_generation  bigint      NOT NULL DEFAULT 0,
    -- The lease that makes one instance the only refresher of a row.
    refresh_lease_until timestamptz,
    refresh_lease_owner text,
    metadata            jsonb       NOT NULL DEFAULT '{}',
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT integrations_provider_account_key UNIQUE (provider, account_id)
);

-- The seed's lookup index: a user's integrations, by provider.
CREATE INDEX integrations_user_provider ON integrations (user_id, provider);

-- The background refresher's scan: connected, refreshable, by expiry.
CREATE INDEX integrations_refresh_due ON integrations (expires_at)
    WHERE status = 'connected' AND refresh_token IS NOT NULL;

-- rotate-keys: rows still under an older key.
CREATE INDEX integrations_key_id ON integrations (key_id);

-- OAuth connect flow: single-use states, expiring after 10 minutes.
CREATE TABLE oauth_states (
    state_hash    bytea       PRIMARY KEY,
    user_id       text        NOT NULL,
    provider      text        NOT NULL,
    redirect_uri  text        NOT NULL,
    code_verifier bytea,
    key_id        text        NOT NULL,
    expires_at    timestamptz NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX oauth_states_expires_at ON oauth_states (expires_at);
