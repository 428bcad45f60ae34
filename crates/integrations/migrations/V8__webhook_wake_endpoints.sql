-- The dispatchers' wake-up names the endpoints that got deliveries (comma
-- separated; empty: any, when the list would not fit a notification), so a
-- dispatcher claims for those and not for every idle endpoint. Instances
-- of the version before read any payload as "any".
CREATE OR REPLACE FUNCTION webhooks_fan_out() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    endpoints text;
BEGIN
    WITH queued AS (
        INSERT INTO webhook_deliveries (endpoint_id, event_id, subject, txid)
        SELECT w.id, NEW.id, hashtextextended(NEW.provider || ':' || NEW.account_id, 0), NEW.txid
        FROM webhook_endpoints w
        WHERE NEW.type = ANY (w.event_types)
        RETURNING endpoint_id
    )
    SELECT string_agg(endpoint_id, ',' ORDER BY endpoint_id) INTO endpoints FROM queued;
    IF endpoints IS NOT NULL THEN
        -- PostgreSQL folds identical notifications of one transaction.
        PERFORM pg_notify('integrations_webhooks',
            CASE WHEN length(endpoints) <= 7000 THEN endpoints ELSE '' END);
    END IF;
    RETURN NULL;
END
$$;
