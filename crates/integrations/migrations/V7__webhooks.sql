-- Webhooks (issue 16): endpoints the application registers, and one
-- delivery per (endpoint, event) written by a trigger on `events` in the
-- same transaction as the event (so as the change itself): a delivery
-- exists exactly when its event committed, and survives any crash until an
-- instance has had a 2xx for it.

CREATE TABLE webhook_endpoints (
    -- 'wh_' and 24 hex digits.
    id               text        PRIMARY KEY,
    url              text        NOT NULL,
    -- The event types sent to it.
    event_types      text[]      NOT NULL,
    -- The signing secret ('whsec_<base64>'), encrypted like tokens
    -- (AAD 'webhook:<id>:secret'), under the key secret_key_id.
    secret           bytea       NOT NULL,
    secret_key_id    text        NOT NULL,
    -- The secret before the last rotation, signing beside the new one until
    -- previous_until (24 h after the rotation).
    previous_secret  bytea,
    previous_key_id  text,
    previous_until   timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- When the attempts started failing without a 2xx since: an endpoint
    -- failing for INTEGRATIONS_WEBHOOK_DISABLE_AFTER (5 days) is disabled.
    failing_since    timestamptz,
    disabled_at      timestamptz,
    disabled_reason  text
);

CREATE TABLE webhook_deliveries (
    id               bigserial   PRIMARY KEY,
    endpoint_id      text        NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    -- Purged with its event (INTEGRATIONS_EVENT_RETENTION, 7 days: longer
    -- than the retries last).
    event_id         bigint      NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    -- The account the event is about (a 64-bit hash of 'provider:account_id';
    -- provider names hold no ':'; two accounts sharing a hash are only
    -- ordered together) and the event's position (txid, event_id), copied
    -- so one account's deliveries to one endpoint go out in order, also
    -- across a delete and a new connection of the same account (two rows).
    -- A number, like the other index keys, so the order index is planned
    -- for the order check even on a queue's stale statistics.
    subject          bigint      NOT NULL,
    txid             xid8        NOT NULL,
    status           text        NOT NULL DEFAULT 'pending'
                                 CHECK (status IN ('pending', 'succeeded', 'failed')),
    -- Attempts made (an attempt counts when it is claimed; never reset,
    -- so a late result of an old claim cannot pass for a newer one's).
    attempts         integer     NOT NULL DEFAULT 0,
    -- The attempts before the current schedule began (a redelivery starts
    -- a fresh schedule from here).
    schedule_from    integer     NOT NULL DEFAULT 0,
    -- When it is due; while an instance is sending it, the end of that
    -- instance's claim (a claim that outlives its instance, killed, is
    -- taken again after it).
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    claimed_by       text,
    last_attempt_at  timestamptz,
    -- The HTTP status of the last attempt (null: no answer).
    last_status      integer,
    last_error       text,
    delivered_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (endpoint_id, event_id)
);

-- The claim: an endpoint's due deliveries, the earliest first.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (endpoint_id, next_attempt_at)
    WHERE status = 'pending';
-- The claim's order check: an integration's earlier pending delivery to the
-- same endpoint holds the later ones back.
-- Led by the account, which no other index is, so the check is planned on
-- it even while the table's statistics are stale (a queue's often are).
CREATE INDEX webhook_deliveries_order
    ON webhook_deliveries (subject, endpoint_id, txid, event_id)
    WHERE status = 'pending';
-- GET /v1/webhooks/{id}/deliveries?status=...
CREATE INDEX webhook_deliveries_listing ON webhook_deliveries (endpoint_id, status, id);
-- Redelivery of an event, and the cascade from the event purge.
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_id);

-- One delivery per endpoint subscribed to the event's type (a disabled one
-- too: its deliveries wait, and go out when it is enabled again), in the
-- event's transaction; then a wake-up for the instances' dispatchers (one
-- per transaction: PostgreSQL folds identical notifications).
CREATE FUNCTION webhooks_fan_out() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries (endpoint_id, event_id, subject, txid)
    SELECT w.id, NEW.id, hashtextextended(NEW.provider || ':' || NEW.account_id, 0), NEW.txid
    FROM webhook_endpoints w
    WHERE NEW.type = ANY (w.event_types);
    IF FOUND THEN
        PERFORM pg_notify('integrations_webhooks', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_webhooks_fan_out
    AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION webhooks_fan_out();
