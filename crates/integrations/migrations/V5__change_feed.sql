-- The change feed: every committed write that changes what an instance may
-- have cached sends a notification on the channel `integrations_changes`, in
-- the same transaction as the write (so it is delivered if and only if the
-- write commits). Triggers, not statements of the service, so no write path
-- can forget it: requests, batches, the background refresher, rotate-keys,
-- the CLI, and an operator's own SQL alike.
--
-- Payload (JSON, far under the 8,000-byte limit):
--   {"kind": "integration", "user_id": "...", "instance": "...", "at": 1733390000123456}
--   {"kind": "api_key", "id": 42, "instance": "...", "at": ...}
-- `instance` is the writer's `integrations.instance` setting (serve sets it
-- on its connections; null elsewhere), `at` the writing transaction's start
-- in microseconds since the epoch. A `user_id` too long for a payload is
-- left out: the receiver then forgets every user. PostgreSQL delivers one
-- notification for identical payloads in one transaction, so a batch
-- sends one per user.

CREATE FUNCTION integrations_change_payload(kind text, field text, value text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT json_build_object(
        'kind', kind,
        field, value,
        'instance', nullif(current_setting('integrations.instance', true), ''),
        'at', (extract(epoch FROM now()) * 1000000)::bigint
    )::text
$$;

CREATE FUNCTION integrations_notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    users text[];
    u text;
    payload text;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        -- No user named: every instance forgets every user.
        users := ARRAY[NULL::text];
    ELSIF TG_OP = 'INSERT' THEN
        users := ARRAY[NEW.user_id];
    ELSIF TG_OP = 'DELETE' THEN
        users := ARRAY[OLD.user_id];
    ELSIF OLD.user_id IS DISTINCT FROM NEW.user_id THEN
        users := ARRAY[OLD.user_id, NEW.user_id];
    ELSE
        users := ARRAY[NEW.user_id];
    END IF;
    FOREACH u IN ARRAY users LOOP
        payload := integrations_change_payload('integration', 'user_id', u);
        IF octet_length(payload) > 7000 THEN
            payload := integrations_change_payload('integration', 'user_id', NULL);
        END IF;
        PERFORM pg_notify('integrations_changes', payload);
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER integrations_change_feed_insert_delete
    AFTER INSERT OR DELETE ON integrations
    FOR EACH ROW EXECUTE FUNCTION integrations_notify_change();

CREATE TRIGGER integrations_change_feed_truncate
    AFTER TRUNCATE ON integrations
    FOR EACH STATEMENT EXECUTE FUNCTION integrations_notify_change();

-- Only what a user's status shows: a lease taken or released (the
-- refresher's claims) changes nothing cached and sends nothing.
CREATE TRIGGER integrations_change_feed_update
    AFTER UPDATE ON integrations
    FOR EACH ROW
    WHEN (
        (OLD.user_id, OLD.provider, OLD.account_id, OLD.status, OLD.scopes, OLD.token_type,
         OLD.expires_at, OLD.last_refresh_at, OLD.refresh_failures, OLD.last_error,
         OLD.metadata, OLD.created_at, OLD.updated_at, OLD.refresh_token IS NULL)
        IS DISTINCT FROM
        (NEW.user_id, NEW.provider, NEW.account_id, NEW.status, NEW.scopes, NEW.token_type,
         NEW.expires_at, NEW.last_refresh_at, NEW.refresh_failures, NEW.last_error,
         NEW.metadata, NEW.created_at, NEW.updated_at, NEW.refresh_token IS NULL)
    )
    EXECUTE FUNCTION integrations_notify_change();

CREATE FUNCTION api_keys_notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(
        'integrations_changes',
        integrations_change_payload(
            'api_key', 'id',
            (CASE TG_OP WHEN 'DELETE' THEN OLD.id WHEN 'TRUNCATE' THEN NULL ELSE NEW.id END)::text
        )
    );
    RETURN NULL;
END
$$;

CREATE TRIGGER api_keys_change_feed
    AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION api_keys_notify_change();

CREATE TRIGGER api_keys_change_feed_truncate
    AFTER TRUNCATE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION api_keys_notify_change();
