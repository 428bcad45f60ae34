-- The connect flow ends with the application's confirmation (issue 11):
-- the start returns a flow id the application keeps in its user's session;
-- the callback stores the provider's answer as pending, and the integration
-- exists only after the application presents the flow id together with the
-- single-use completion code the callback gave the browser.
--
-- States started before this version carry no flow: they cannot be
-- confirmed, so they are dropped (each lasts 10 minutes at most).
DELETE FROM oauth_states;
ALTER TABLE oauth_states ADD COLUMN flow_hash bytea NOT NULL;

CREATE TABLE oauth_pending (
    flow_hash        bytea       PRIMARY KEY,
    completion_hash  bytea       NOT NULL,
    user_id          text        NOT NULL,
    provider         text        NOT NULL,
    account_id       text        NOT NULL,
    -- The token response, as JSON, encrypted (AES-256-GCM under key_id,
    -- associated data naming the flow).
    tokens           bytea       NOT NULL,
    key_id           text        NOT NULL,
    expires_at       timestamptz NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX oauth_pending_expires_at ON oauth_pending (expires_at);
