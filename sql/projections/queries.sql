-- Set-based application of the built-in projections: each apply statement takes the events of
-- one batch, the position range ($1, $2] of the projection's event types $3, checks them all
-- and folds them into its tables, order by order in version order. Events at or below the version
-- a projection has applied are replays and change nothing.

-- name: checked_batch
-- The common head of every apply statement, for a projection that keeps its per-order version in
-- {state_table}.{version_column}. `verdict` raises (ending the statement) at the first event that
-- cannot be applied: invalid data, a second OrderCreated, or no OrderCreated applied.
batch AS MATERIALIZED (
    SELECT e.position, e.aggregate_id, e.event_type, e.version, e.data, e.created_at,
           pgprojector_order_event_problem(e.aggregate_id, e.event_type, e.data) AS problem
    FROM events e
    WHERE e.position > $1 AND e.position <= $2 AND e.aggregate_type = 'order' AND e.event_type = ANY($3::text[])
), creations AS (
    SELECT aggregate_id, min(position) AS first_created FROM batch
    WHERE event_type = 'OrderCreated' GROUP BY aggregate_id
), orders_seen AS MATERIALIZED (
    SELECT DISTINCT (data ->> 'order_id')::bigint AS order_id FROM batch WHERE problem IS NULL
), known_versions AS MATERIALIZED (
    -- The batch's orders only, by primary key: no pass over the whole state table per batch.
    SELECT s.order_id, s.{version_column} AS known_version
    FROM orders_seen o JOIN {state_table} s ON s.order_id = o.order_id
), judged AS MATERIALIZED (
    SELECT b.*, CASE WHEN b.problem IS NULL THEN (b.data ->> 'order_id')::bigint END AS order_id,
           k.known_version, coalesce(c.first_created < b.position, false) AS created_earlier
    FROM batch b
    LEFT JOIN creations c USING (aggregate_id)
    LEFT JOIN known_versions k ON k.order_id = CASE WHEN b.problem IS NULL THEN (b.data ->> 'order_id')::bigint END
), verdict AS (
    SELECT pgprojector_reject_order_event(position, aggregate_id, event_type, version, problem) AS rejected
    FROM (SELECT position, aggregate_id, event_type, version, CASE
              WHEN problem IS NOT NULL THEN problem
              WHEN known_version IS NOT NULL AND version <= known_version THEN NULL
              WHEN event_type = 'OrderCreated' AND (known_version IS NOT NULL OR created_earlier)
                  THEN 'the order exists already'
              WHEN event_type <> 'OrderCreated' AND known_version IS NULL AND NOT created_earlier
                  THEN 'no OrderCreated applied for this order'
          END AS problem FROM judged) j
    WHERE problem IS NOT NULL
    ORDER BY position
    LIMIT 1
), fresh AS (
    SELECT * FROM judged WHERE (known_version IS NULL OR version > known_version) AND NOT EXISTS (SELECT FROM verdict)
)

-- name: orders_apply
WITH {checked_batch}, latest AS (
    -- Each order's latest event in the batch...
    SELECT DISTINCT ON (order_id) order_id, version AS current_version, event_type AS last_type,
           created_at AS updated_at
    FROM fresh ORDER BY order_id, version DESC
), latest_of_type AS (
    -- ... and its latest event of each type that carries columns (one sort, not one per column).
    SELECT DISTINCT ON (order_id, event_type) order_id, event_type, data, created_at
    FROM fresh WHERE event_type IN ('OrderCreated', 'OrderConfirmed', 'DriverAssigned')
    ORDER BY order_id, event_type, version DESC
), per_order AS (
    SELECT l.*, c.data AS created, c.created_at, f.data AS confirmed, d.data AS driver
    FROM latest l
    LEFT JOIN latest_of_type c ON c.order_id = l.order_id AND c.event_type = 'OrderCreated'
    LEFT JOIN latest_of_type f ON f.order_id = l.order_id AND f.event_type = 'OrderConfirmed'
    LEFT JOIN latest_of_type d ON d.order_id = l.order_id AND d.event_type = 'DriverAssigned'
), created AS (
    INSERT INTO read_model_orders (order_id, user_id, restaurant_id, status, items, total_amount, delivery_address,
                                   created_at, updated_at, current_version, user_name, restaurant_name, driver_name,
                                   estimated_delivery)
    SELECT order_id, (created ->> 'user_id')::bigint, (confirmed ->> 'restaurant_id')::bigint,
           pgprojector_order_status(last_type), created -> 'items', pgprojector_money(created -> 'total_amount'),
           created ->> 'delivery_address', created_at, updated_at, current_version, created ->> 'user_name',
           confirmed ->> 'restaurant_name', driver ->> 'driver_name', (confirmed ->> 'estimated_delivery')::timestamptz
    FROM per_order WHERE created IS NOT NULL
    RETURNING 1
)
UPDATE read_model_orders t SET
    status = pgprojector_order_status(p.last_type),
    updated_at = p.updated_at,
    current_version = p.current_version,
    restaurant_id = coalesce((p.confirmed ->> 'restaurant_id')::bigint, t.restaurant_id),
    restaurant_name = coalesce(p.confirmed ->> 'restaurant_name', t.restaurant_name),
    estimated_delivery = coalesce((p.confirmed ->> 'estimated_delivery')::timestamptz, t.estimated_delivery),
    driver_name = coalesce(p.driver ->> 'driver_name', t.driver_name)
FROM per_order p
WHERE p.order_id = t.order_id AND p.created IS NULL

-- name: dashboard_apply
WITH {checked_batch}, per_order AS (
    SELECT DISTINCT ON (order_id) order_id, version, event_type AS last_type,
           -- A batch holds at most one OrderCreated per order (the check refuses a second).
           max(pgprojector_money(data -> 'total_amount')) FILTER (WHERE event_type = 'OrderCreated')
               OVER (PARTITION BY order_id) AS amount
    FROM fresh ORDER BY order_id, version DESC
), moved AS (
    SELECT p.order_id, s.status AS old_status, s.total_amount AS old_amount,
           pgprojector_order_status(p.last_type) AS new_status, coalesce(p.amount, s.total_amount) AS amount, p.version
    FROM per_order p LEFT JOIN projection_dashboard_orders s USING (order_id)
), remembered AS (
    INSERT INTO projection_dashboard_orders (order_id, status, total_amount, version)
    SELECT order_id, new_status, amount, version FROM moved
    ON CONFLICT (order_id) DO UPDATE SET status = EXCLUDED.status, version = EXCLUDED.version
    RETURNING 1
), deltas AS (
    SELECT status, sum(n) AS n, sum(amount) AS amount FROM (
        SELECT old_status AS status, -1 AS n, -old_amount AS amount FROM moved WHERE old_status IS NOT NULL
        UNION ALL
        SELECT new_status, 1, amount FROM moved
    ) d GROUP BY status
)
INSERT INTO read_model_dashboard AS d (status, order_count, total_amount)
SELECT status, n, amount FROM deltas WHERE n <> 0 OR amount <> 0
ON CONFLICT (status) DO UPDATE SET
    order_count = d.order_count + EXCLUDED.order_count, total_amount = d.total_amount + EXCLUDED.total_amount

-- name: dashboard_drop_empty
DELETE FROM read_model_dashboard WHERE order_count = 0

-- name: analytics_apply
WITH {checked_batch}, known AS (
    SELECT f.*, s.restaurant_id AS known_restaurant, s.total_amount AS known_amount
    FROM fresh f LEFT JOIN projection_analytics_orders s USING (order_id)
), enriched AS (
    -- Each event with the restaurant that had confirmed the order by then, and the order's amount.
    SELECT order_id, event_type, version, created_at,
           coalesce((array_agg((data ->> 'restaurant_id')::bigint) FILTER (WHERE event_type = 'OrderConfirmed')
                         OVER w)[count(*) FILTER (WHERE event_type = 'OrderConfirmed') OVER w],
                    known_restaurant) AS restaurant_id,
           coalesce(known_amount, (array_agg(pgprojector_money(data -> 'total_amount'))
                                       FILTER (WHERE event_type = 'OrderCreated') OVER w)[1]) AS amount
    FROM known
    WINDOW w AS (PARTITION BY order_id ORDER BY version)
), counted AS (
    INSERT INTO read_model_restaurant_daily AS r (restaurant_id, day, confirmed, delivered, cancelled, revenue)
    SELECT restaurant_id, (created_at AT TIME ZONE 'UTC')::date,
           count(*) FILTER (WHERE event_type = 'OrderConfirmed'),
           count(*) FILTER (WHERE event_type = 'OrderDelivered'),
           count(*) FILTER (WHERE event_type = 'OrderCancelled'),
           coalesce(sum(amount) FILTER (WHERE event_type = 'OrderDelivered'), 0)
    FROM enriched
    WHERE restaurant_id IS NOT NULL AND event_type IN ('OrderConfirmed', 'OrderDelivered', 'OrderCancelled')
    GROUP BY 1, 2
    ON CONFLICT (restaurant_id, day) DO UPDATE SET
        confirmed = r.confirmed + EXCLUDED.confirmed, delivered = r.delivered + EXCLUDED.delivered,
        cancelled = r.cancelled + EXCLUDED.cancelled, revenue = r.revenue + EXCLUDED.revenue
    RETURNING 1
)
INSERT INTO projection_analytics_orders AS o (order_id, total_amount, restaurant_id, version)
SELECT DISTINCT ON (order_id) order_id, amount, restaurant_id, version
FROM enriched ORDER BY order_id, version DESC
ON CONFLICT (order_id) DO UPDATE SET restaurant_id = EXCLUDED.restaurant_id, version = EXCLUDED.version
