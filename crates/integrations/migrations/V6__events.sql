-- Events (issue 16): the outbox of what happened to integrations, written
-- by triggers in the same transaction as the change itself, so an event
-- exists exactly when its change committed (nothing lost on a crash,
-- nothing announced that rolled back), whichever path wrote it: requests,
-- batches, the background refresher, the connect flow, rotate-keys, the
-- CLI, an operator's own SQL.
--
-- One event per row change that is news, the type saying what changed
-- (first match wins):
--   INSERT                                         integration.connected
--   DELETE                                         integration.deleted
--   tokens stored again by the application (PUT or the connect flow:
--     connect_generation moved) while the row was not healthy (status not
--     connected, or refresh failures counted)      integration.reconnected
--   status became revoked                          integration.revoked
--   status became error                            integration.error
--   back to connected with no failure counted, from a row that was not
--     healthy, without the application storing tokens (a refresh)
--                                                  integration.recovered
--   refresh_failures grew, status unchanged        integration.refresh_failed
-- Anything else (a successful refresh of a healthy row, tokens stored again
-- for a healthy row, a lease taken or given back, rotate-keys rewriting
-- ciphertexts, metadata) is traffic, not news: no event. A TRUNCATE of
-- integrations (an operator's) records nothing.

-- Told apart by the application storing tokens, not by the status: a
-- refresh that succeeds (recovered) and a PUT (reconnected) both end in
-- `connected` with no failures. Incremented only by the store's upsert.
ALTER TABLE integrations ADD COLUMN connect_generation bigint NOT NULL DEFAULT 0;

-- The code of the last refresh error (`invalid_grant`, the provider's
-- other `error` codes, `temporary_failure`, ...), beside its message in
-- last_error; set and cleared with it. Rows that failed before this
-- version have a message and no code: their events say `refresh_failed`.
ALTER TABLE integrations ADD COLUMN last_error_code text;

CREATE TABLE events (
    id               bigserial   PRIMARY KEY,
    -- The writing transaction (64-bit, never wraps), or the txid of the
    -- integration's previous event when that is higher (see
    -- integrations_event_position): the polling cursor's first half. See
    -- store/events.rs for why ids alone are not a cursor.
    txid             xid8        NOT NULL DEFAULT pg_current_xact_id(),
    type             text        NOT NULL CHECK (type IN (
                         'integration.connected', 'integration.reconnected',
                         'integration.refresh_failed', 'integration.error',
                         'integration.revoked', 'integration.recovered',
                         'integration.deleted')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- The row (for ordering per integration); not in the payload.
    integration_id   bigint      NOT NULL,
    user_id          text        NOT NULL,
    provider         text        NOT NULL,
    account_id       text        NOT NULL,
    -- null for integration.deleted (the row is gone).
    status           text,
    -- null for integration.connected (there was no row).
    previous_status  text,
    refresh_failures integer     NOT NULL,
    error_code       text,
    error_message    text,
    expires_at       timestamptz
    -- Never a token, a client secret or a key: nothing here is encrypted
    -- because nothing here is secret.
);

-- GET /v1/events: pages in (txid, id) order after a cursor, with and
-- without a type filter.
CREATE INDEX events_cursor ON events (txid, id);
CREATE INDEX events_type_cursor ON events (type, txid, id);
-- The retention purge: the oldest first.
CREATE INDEX events_created_at ON events (created_at);
-- The trigger's look-up of an integration's latest event.
CREATE INDEX events_integration ON events (integration_id, txid);

-- An event's position (its cursor's first half): the writing transaction's
-- id, or the txid of the integration's latest event when that is higher,
-- so one integration's events page in the order they happened. The two
-- differ when a transaction got its id before another that changed the
-- same row and committed first (ids are assigned at a transaction's first
-- write, anywhere, not when it reaches this row). Never below the
-- transaction's own id, so the cursor stays safe (store/events.rs): an
-- event is still hidden until every transaction below its position has
-- ended. Changes of one integration are serialised by its row lock, and
-- this runs after the change (after any wait for that lock), with a
-- snapshot of its own, so it sees the integration's latest committed
-- event.
CREATE FUNCTION integrations_event_position(integration bigint) RETURNS xid8
LANGUAGE sql VOLATILE AS $$
    SELECT GREATEST(pg_current_xact_id(),
                    (SELECT txid FROM events WHERE integration_id = integration
                     ORDER BY txid DESC LIMIT 1))
$$;

CREATE FUNCTION integrations_record_event() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    kind text;
    r integrations%ROWTYPE;
    before text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        kind := 'integration.connected';
        r := NEW;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO events (txid, type, integration_id, user_id, provider, account_id, status,
                            previous_status, refresh_failures, expires_at)
        VALUES (integrations_event_position(OLD.id), 'integration.deleted', OLD.id, OLD.user_id,
                OLD.provider, OLD.account_id, NULL, OLD.status, OLD.refresh_failures,
                OLD.expires_at);
        RETURN NULL;
    ELSE
        r := NEW;
        before := OLD.status;
        IF NEW.connect_generation IS DISTINCT FROM OLD.connect_generation THEN
            IF OLD.status <> 'connected' OR OLD.refresh_failures > 0 THEN
                kind := 'integration.reconnected';
            END IF;
        ELSIF NEW.status = 'revoked' AND OLD.status <> 'revoked' THEN
            kind := 'integration.revoked';
        ELSIF NEW.status = 'error' AND OLD.status <> 'error' THEN
            kind := 'integration.error';
        ELSIF NEW.status = 'connected' AND NEW.refresh_failures = 0
              AND (OLD.status <> 'connected' OR OLD.refresh_failures > 0) THEN
            kind := 'integration.recovered';
        ELSIF NEW.refresh_failures > OLD.refresh_failures THEN
            kind := 'integration.refresh_failed';
        END IF;
        IF kind IS NULL THEN
            RETURN NULL;
        END IF;
    END IF;
    INSERT INTO events (txid, type, integration_id, user_id, provider, account_id, status,
                        previous_status, refresh_failures, error_code, error_message, expires_at)
    VALUES (integrations_event_position(r.id), kind, r.id, r.user_id, r.provider, r.account_id,
            r.status, before,
            r.refresh_failures,
            CASE WHEN r.last_error IS NOT NULL THEN COALESCE(r.last_error_code, 'refresh_failed') END,
            r.last_error, r.expires_at);
    RETURN NULL;
END
$$;

CREATE TRIGGER integrations_events_insert_delete
    AFTER INSERT OR DELETE ON integrations
    FOR EACH ROW EXECUTE FUNCTION integrations_record_event();

-- Only updates that can be news enter the function: lease claims and
-- releases, rotate-keys and successful refreshes of healthy rows change
-- none of these columns.
CREATE TRIGGER integrations_events_update
    AFTER UPDATE ON integrations
    FOR EACH ROW
    WHEN (
        (OLD.status, OLD.refresh_failures, OLD.connect_generation)
        IS DISTINCT FROM
        (NEW.status, NEW.refresh_failures, NEW.connect_generation)
    )
    EXECUTE FUNCTION integrations_record_event();
