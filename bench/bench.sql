-- The benchmark's own SQL, loaded by name (`-- name: <key>` starts each one), as in sql/queries.sql.
-- Nothing here is part of pgprojector: it runs only in the throwaway benchmark database.

-- name: scratch_tables
-- The raw baselines build these; `LIKE ... INCLUDING ALL` gives them the read models' exact
-- columns, types, primary keys and indexes, so they cost the same to write.
CREATE TABLE IF NOT EXISTS bench_base_orders (LIKE read_model_orders INCLUDING ALL);
CREATE TABLE IF NOT EXISTS bench_base_general_orders (LIKE read_model_orders INCLUDING ALL);
CREATE TABLE IF NOT EXISTS bench_base_dashboard (LIKE read_model_dashboard INCLUDING ALL);
CREATE TABLE IF NOT EXISTS bench_base_daily (LIKE read_model_restaurant_daily INCLUDING ALL);
CREATE TABLE IF NOT EXISTS bench_raw_orders (LIKE read_model_orders INCLUDING ALL);

-- name: dataset_shape
-- What the fast baseline assumes of the log (checked, and reported): one OrderCreated per order,
-- at most one OrderConfirmed and one DriverAssigned, created_at never going back within an order.
SELECT count(*) AS orders,
       count(*) FILTER (WHERE created <> 1) AS not_one_created,
       count(*) FILTER (WHERE confirmed > 1 OR assigned > 1) AS repeated_fields,
       count(*) FILTER (WHERE backwards) AS time_going_back,
       sum(crosses_midnight::int) AS lives_crossing_midnight_utc
FROM (
    SELECT aggregate_id,
           count(*) FILTER (WHERE event_type = 'OrderCreated') AS created,
           count(*) FILTER (WHERE event_type = 'OrderConfirmed') AS confirmed,
           count(*) FILTER (WHERE event_type = 'DriverAssigned') AS assigned,
           bool_or(created_at < prev_at) AS backwards,
           (min(created_at) AT TIME ZONE 'UTC')::date <> (max(created_at) AT TIME ZONE 'UTC')::date AS crosses_midnight
    FROM (SELECT aggregate_id, event_type, created_at,
                 lag(created_at) OVER (PARTITION BY aggregate_id ORDER BY version) AS prev_at
          FROM events) e
    GROUP BY aggregate_id
) o

-- name: baseline_orders_fast
-- The fastest set-based build of read_model_orders found: one sequential scan, one hash
-- aggregate, no sort. The last event (status) comes from a text-composite max over
-- (version, event_type); the other fields from FILTERed aggregates, which is exact when every
-- order has one OrderCreated and at most one OrderConfirmed / DriverAssigned (dataset_shape).
INSERT INTO bench_base_orders (order_id, user_id, restaurant_id, status, items, total_amount, delivery_address,
                               created_at, updated_at, current_version, user_name, restaurant_name, driver_name,
                               estimated_delivery)
SELECT order_id, user_id, restaurant_id,
       CASE substr(last_event, 20)
           WHEN 'OrderCreated' THEN 'created' WHEN 'OrderConfirmed' THEN 'confirmed'
           WHEN 'DriverAssigned' THEN 'driver_assigned' WHEN 'OrderPickedUp' THEN 'picked_up'
           WHEN 'OrderDelivered' THEN 'delivered' ELSE 'cancelled' END,
       items, total_amount, delivery_address, created_at, updated_at, current_version, user_name,
       restaurant_name, driver_name, estimated_delivery
FROM (
    SELECT max((data->>'order_id')::bigint) FILTER (WHERE event_type = 'OrderCreated') AS order_id,
           max((data->>'user_id')::bigint) FILTER (WHERE event_type = 'OrderCreated') AS user_id,
           (array_agg(data->'items') FILTER (WHERE event_type = 'OrderCreated'))[1] AS items,
           max((data->>'total_amount')::numeric) FILTER (WHERE event_type = 'OrderCreated') AS total_amount,
           max(data->>'delivery_address') FILTER (WHERE event_type = 'OrderCreated') AS delivery_address,
           max(data->>'user_name') FILTER (WHERE event_type = 'OrderCreated') AS user_name,
           max(created_at) FILTER (WHERE event_type = 'OrderCreated') AS created_at,
           max((data->>'restaurant_id')::bigint) FILTER (WHERE event_type = 'OrderConfirmed') AS restaurant_id,
           max(data->>'restaurant_name') FILTER (WHERE event_type = 'OrderConfirmed') AS restaurant_name,
           max((data->>'estimated_delivery')::timestamptz) FILTER (WHERE event_type = 'OrderConfirmed')
               AS estimated_delivery,
           max(data->>'driver_name') FILTER (WHERE event_type = 'DriverAssigned') AS driver_name,
           max(to_char(version, 'FM0000000000000000000') || event_type) AS last_event,
           max(created_at) AS updated_at,
           max(version) AS current_version
    FROM events
    WHERE aggregate_type = 'order'
      AND event_type IN ('OrderCreated', 'OrderConfirmed', 'DriverAssigned', 'OrderPickedUp', 'OrderDelivered',
                         'OrderCancelled')
    GROUP BY aggregate_id
) o

-- name: baseline_orders_general
-- The same table without the dataset assumptions: every "latest" field is taken by version
-- order (ordered aggregates: a sort per order), exactly as the projection's last-wins rule.
INSERT INTO bench_base_general_orders (order_id, user_id, restaurant_id, status, items, total_amount,
                                       delivery_address, created_at, updated_at, current_version, user_name,
                                       restaurant_name, driver_name, estimated_delivery)
SELECT (created->>'order_id')::bigint, (created->>'user_id')::bigint, (confirmed->>'restaurant_id')::bigint,
       CASE last_type
           WHEN 'OrderCreated' THEN 'created' WHEN 'OrderConfirmed' THEN 'confirmed'
           WHEN 'DriverAssigned' THEN 'driver_assigned' WHEN 'OrderPickedUp' THEN 'picked_up'
           WHEN 'OrderDelivered' THEN 'delivered' ELSE 'cancelled' END,
       created->'items', (created->>'total_amount')::numeric, created->>'delivery_address', created_at,
       updated_at, current_version, created->>'user_name', confirmed->>'restaurant_name',
       assigned->>'driver_name', (confirmed->>'estimated_delivery')::timestamptz
FROM (
    SELECT (array_agg(data ORDER BY version) FILTER (WHERE event_type = 'OrderCreated'))[1] AS created,
           (array_agg(created_at ORDER BY version) FILTER (WHERE event_type = 'OrderCreated'))[1] AS created_at,
           (array_agg(data ORDER BY version DESC) FILTER (WHERE event_type = 'OrderConfirmed'))[1] AS confirmed,
           (array_agg(data ORDER BY version DESC) FILTER (WHERE event_type = 'DriverAssigned'))[1] AS assigned,
           (array_agg(event_type ORDER BY version DESC))[1] AS last_type,
           (array_agg(created_at ORDER BY version DESC))[1] AS updated_at,
           max(version) AS current_version
    FROM events
    WHERE aggregate_type = 'order'
      AND event_type IN ('OrderCreated', 'OrderConfirmed', 'DriverAssigned', 'OrderPickedUp', 'OrderDelivered',
                         'OrderCancelled')
    GROUP BY aggregate_id
) o

-- name: baseline_dashboard
-- Every order once, in its current status (from the orders table just built).
INSERT INTO bench_base_dashboard (status, order_count, total_amount)
SELECT status, count(*), sum(total_amount) FROM bench_base_orders GROUP BY status

-- name: baseline_daily
-- Per confirming restaurant and UTC day of the counting event (dataset_shape: one confirmation).
INSERT INTO bench_base_daily (restaurant_id, day, confirmed, delivered, cancelled, revenue)
SELECT c.restaurant_id, (e.created_at AT TIME ZONE 'UTC')::date,
       count(*) FILTER (WHERE e.event_type = 'OrderConfirmed'),
       count(*) FILTER (WHERE e.event_type = 'OrderDelivered'),
       count(*) FILTER (WHERE e.event_type = 'OrderCancelled'),
       coalesce(sum(a.total_amount) FILTER (WHERE e.event_type = 'OrderDelivered'), 0)
FROM events e
JOIN (SELECT aggregate_id, version, (data->>'restaurant_id')::bigint AS restaurant_id
      FROM events WHERE event_type = 'OrderConfirmed' AND aggregate_type = 'order') c
  ON c.aggregate_id = e.aggregate_id AND e.version >= c.version
JOIN (SELECT aggregate_id, (data->>'total_amount')::numeric(10,2) AS total_amount
      FROM events WHERE event_type = 'OrderCreated' AND aggregate_type = 'order') a
  ON a.aggregate_id = e.aggregate_id
WHERE e.aggregate_type = 'order' AND e.event_type IN ('OrderConfirmed', 'OrderDelivered', 'OrderCancelled')
GROUP BY 1, 2

-- name: visibility_triggers
-- Latency probe: a row becoming visible in either orders table NOTIFYs `bench_visible` at its
-- commit, with the order and version it now shows. Created only after the catch-up runs.
CREATE OR REPLACE FUNCTION bench_notify_visible() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bench_visible', TG_TABLE_NAME || ' ' || NEW.order_id || ' ' || NEW.current_version);
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS bench_visible ON read_model_orders;
CREATE TRIGGER bench_visible AFTER INSERT OR UPDATE ON read_model_orders
    FOR EACH ROW EXECUTE FUNCTION bench_notify_visible();
DROP TRIGGER IF EXISTS bench_visible ON bench_raw_orders;
CREATE TRIGGER bench_visible AFTER INSERT OR UPDATE ON bench_raw_orders
    FOR EACH ROW EXECUTE FUNCTION bench_notify_visible();

-- name: raw_apply_next
-- The raw latency baseline's whole projection step: the next event after $1 into
-- bench_raw_orders, in one autocommitted statement. No horizon (it can skip an event under
-- concurrent writers, see NOTES.md 1), no checkpoint table, no validation: the floor.
WITH e AS (
    SELECT position, event_type, data, version, created_at, (data->>'order_id')::bigint AS order_id
    FROM events WHERE position > $1 ORDER BY position LIMIT 1
), created AS (
    INSERT INTO bench_raw_orders (order_id, user_id, status, items, total_amount, delivery_address, created_at,
                                  updated_at, current_version, user_name)
    SELECT order_id, (data->>'user_id')::bigint, 'created', data->'items', (data->>'total_amount')::numeric,
           data->>'delivery_address', created_at, created_at, version, data->>'user_name'
    FROM e WHERE event_type = 'OrderCreated'
    ON CONFLICT (order_id) DO NOTHING
), changed AS (
    UPDATE bench_raw_orders o SET
        status = CASE e.event_type
            WHEN 'OrderConfirmed' THEN 'confirmed' WHEN 'DriverAssigned' THEN 'driver_assigned'
            WHEN 'OrderPickedUp' THEN 'picked_up' WHEN 'OrderDelivered' THEN 'delivered' ELSE 'cancelled' END,
        restaurant_id = coalesce((e.data->>'restaurant_id')::bigint, o.restaurant_id),
        restaurant_name = coalesce(e.data->>'restaurant_name', o.restaurant_name),
        estimated_delivery = coalesce((e.data->>'estimated_delivery')::timestamptz, o.estimated_delivery),
        driver_name = coalesce(e.data->>'driver_name', o.driver_name),
        updated_at = e.created_at, current_version = e.version
    FROM e
    WHERE e.event_type <> 'OrderCreated' AND o.order_id = e.order_id AND o.current_version < e.version
)
SELECT position FROM e
