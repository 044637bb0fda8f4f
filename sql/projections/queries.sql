-- Set-based application of the built-in projections: each apply statement takes the events of
-- one batch, the position range ($1, $2] of the projection's event types $3, checks them all
-- and folds them into its tables, order by order in version order, and returns how many events
-- the batch held. Events at or below the version a projection has applied are replays and change
-- nothing.

-- name: apply_settings
-- Set before each apply statement, for its transaction only (SET LOCAL; order_events resets the
-- planner settings before any follow-up query). {batch_bytes} is an integer order_events fills in:
-- these statements go in one simple query, with no parameters.
-- - enable_nestloop, enable_seqscan: plans that hold whatever the planner guesses of a CTE's size,
--   for which it has no statistics. Hash joins between the batch's CTEs, never a nested loop
--   rescanning one of them per row; state tables read by index (`= ANY(ARRAY(...))`, a scan that
--   needs no nested loop) even by a generic plan cached while they were small, which would
--   otherwise go on scanning them whole as they grow.
-- - plan_cache_mode: always that cached generic plan. Left to choose, PostgreSQL compares it with a
--   plan made for the actual positions, which for the one-event batches of an idle daemon over a
--   large log always looks cheaper: it planned every batch again, 2 to 3 ms each, in the
--   commit-to-visible latency (p50 9.2 ms for all three projections over the benchmark's 200,000
--   events; 5.5 to 6.2 ms with the generic plan).
-- - work_mem, raised to {batch_bytes} and never lowered: the batch's CTEs are kept in work_mem and
--   spill to temporary files past it, to be read back by every join (a batch of 20000 positions,
--   4.5 MB, spilled at the default 4MB).
SET LOCAL enable_nestloop = off;
SET LOCAL enable_seqscan = off;
SET LOCAL plan_cache_mode = force_generic_plan;
SELECT set_config('work_mem', (greatest(pg_size_bytes(current_setting('work_mem')), {batch_bytes}) / 1024)::text || 'kB',
                  true)

-- name: checked_batch
-- The common head of every apply statement, a template (order_events.apply_statement fills it in):
-- `fields` the data fields the projection reads (a text[] literal), `summary` its own per-order
-- aggregates (section <name>_summary), `state_table` and `version_column` where it keeps each
-- order's applied version, `known` what else it needs of that row (section <name>_known); and the
-- check, full or optimistic (sections full_check_* and optimistic_check_*): `also_ok` what else
-- an event must pass, `creations` the per-order aggregates of OrderCreated events, `looked_up`
-- which orders' row to look up, `verdict` what ends the statement instead of applying the batch.
--
-- Events of one aggregate are in version order in the log (the insert trigger draws positions in
-- order), so within a batch each order's events are contiguous versions first..last. Those at or
-- below the version the projection has applied are replays: they change nothing, and the apply
-- statements use only an order's events above it.
batch AS MATERIALIZED (
    SELECT e.position, e.aggregate_id, e.event_type, e.version, e.data, e.created_at,
           pgprojector_order_data_ok(e.aggregate_id, e.event_type, e.data, {fields}) {also_ok} AS ok
    FROM events e
    WHERE e.position > $1 AND e.position <= $2 AND e.aggregate_type = 'order' AND e.event_type = ANY($3::text[])
), summary AS MATERIALIZED (
    -- One row per order of the batch (a hash aggregate, no sort). Positions name events (joins on
    -- them hash a bigint; the planner, blind to a CTE's statistics, takes every equality to keep
    -- 1 row in 200, so joins name an event by two of them, or it expects millions of rows);
    -- versions compare with the version applied. (The inner query keeps the aggregate_id check to
    -- one evaluation per order: a grouped subquery is not flattened into the outer one.)
    SELECT *, CASE WHEN aggregate_ok THEN substr(aggregate_id, 7)::bigint END AS order_id
    FROM (
        SELECT aggregate_id, bool_and(ok) AS data_ok, pgprojector_is_order_aggregate(aggregate_id) AS aggregate_ok,
               min(position) AS first_position, max(position) AS last_position,
               min(version) AS first_version, max(version) AS last_version
               {creations}
               {summary}
        FROM batch GROUP BY aggregate_id
    ) orders
), per_order AS MATERIALIZED (
    -- With the version each order has applied, looked up by primary key (= ANY of an array: an
    -- index scan whatever the planner guesses of a CTE's size, never a pass over the whole table).
    SELECT s.*, t.{version_column} AS known_version {known}
    FROM summary s
    LEFT JOIN {state_table} t
      ON t.order_id = s.order_id
     AND t.order_id = ANY (ARRAY(SELECT order_id FROM summary WHERE order_id IS NOT NULL {looked_up}))
), {verdict}, changed AS (
    -- The orders the batch moves past their applied version, once every event has passed the verdict.
    -- (Not MATERIALIZED: a statement that reads it once reads it in place of a copy.)
    SELECT * FROM per_order
    WHERE last_version > coalesce(known_version, 0) AND NOT EXISTS (SELECT FROM verdict)
)

-- name: full_check_creations
-- The full check: every order's row looked up, and the verdict raises at the first event that
-- cannot be applied, naming it: invalid data, an OrderCreated of an order that exists, or an event
-- of an order with no OrderCreated.
, count(*) FILTER (WHERE event_type = 'OrderCreated') AS creations,
  min(version) FILTER (WHERE event_type = 'OrderCreated') AS created_version,
  max(version) FILTER (WHERE event_type = 'OrderCreated') AS last_created_version,
  max(position) FILTER (WHERE event_type = 'OrderCreated') AS last_created_position

-- name: full_check_verdict
verdict AS (
    SELECT pgprojector_reject_order_event(e.position, e.aggregate_id, e.event_type, e.version, coalesce(
               r.problem, pgprojector_order_event_problem(e.aggregate_id, e.event_type, e.data, {fields}),
               'invalid data')) AS rejected
    FROM (
        -- (a pass over the batch only when some order has an event that fails: a one-time filter)
        SELECT position, NULL AS problem FROM batch WHERE NOT ok AND EXISTS (SELECT FROM summary WHERE NOT data_ok)
        UNION ALL
        SELECT first_position, NULL FROM per_order WHERE NOT aggregate_ok
        UNION ALL
        SELECT CASE WHEN known_version IS NULL AND (creations = 0 OR created_version > first_version)
                    THEN first_position ELSE last_created_position END,
               CASE WHEN known_version IS NULL AND (creations = 0 OR created_version > first_version)
                    THEN 'no OrderCreated applied for this order' ELSE 'the order exists already' END
        FROM per_order
        WHERE data_ok AND aggregate_ok AND CASE WHEN known_version IS NULL THEN creations <> 1 OR created_version > first_version
                          ELSE last_created_version > known_version END
    ) r
    JOIN batch e USING (position)
    ORDER BY e.position
    LIMIT 1
)

-- name: optimistic_check_also_ok
-- The optimistic check, for the usual batch: an order whose version 1 is in the batch is taken to
-- be new, unlooked-up, and an event passes only if it is an OrderCreated exactly when it is a
-- version 1. Then a valid batch creates each new order with its first event and no order twice,
-- and needs no per-order count of OrderCreated events. Any doubt (an event that fails, a bad
-- aggregate id, a known order's second OrderCreated, an order neither new nor known) ends the
-- statement; so does the primary key of a new order's row that exists. The worker's apply then
-- runs the full check (order_events.order_projection), which names the event or finds nothing wrong.
AND (e.event_type = 'OrderCreated') = (e.version = 1)

-- name: optimistic_check_looked_up
AND first_version > 1

-- name: optimistic_check_verdict
verdict AS (
    SELECT pgprojector_doubt_batch(first_position) AS rejected
    FROM per_order
    WHERE NOT (data_ok AND aggregate_ok AND (first_version = 1 OR known_version IS NOT NULL))
    LIMIT 1
)

-- name: orders_summary
-- (The position of a valid OrderConfirmed counts once its estimated_delivery is cast. Every one is
-- cast here, not only the one folded into the row: the check passes its shape, and a time of that
-- shape that PostgreSQL refuses (2026-02-30, 25:00, a zone of +16:00) must stop the statement
-- whatever else the batch holds, as it would alone. Halving the failed batch then finds that event:
-- the check cannot, PostgreSQL 15 has no error-free cast.)
, max(CASE WHEN NOT ok OR (data ->> 'estimated_delivery')::timestamptz IS NOT NULL THEN position END)
      FILTER (WHERE event_type = 'OrderConfirmed') AS confirmed_position,
  max(position) FILTER (WHERE event_type = 'DriverAssigned') AS assigned_position

-- name: orders_apply
WITH {checked_batch}, folded AS (
    -- Each changed order's last event, its OrderCreated, and its last OrderConfirmed and DriverAssigned
    -- above the applied version (a replayed one is in the row already).
    SELECT p.order_id, p.known_version, p.last_version, l.event_type AS last_type, l.created_at AS updated_at,
           c.data AS created, c.created_at, f.data AS confirmed, d.data AS driver
    FROM changed p
    JOIN batch l ON l.position = p.last_position AND l.version = p.last_version
    -- (a new order's OrderCreated is its first event: the verdict saw to it)
    LEFT JOIN batch c ON c.position = p.first_position AND c.event_type = 'OrderCreated'
    LEFT JOIN batch f ON f.position = p.confirmed_position AND f.event_type = 'OrderConfirmed'
                     AND f.version > coalesce(p.known_version, 0)
    LEFT JOIN batch d ON d.position = p.assigned_position AND d.event_type = 'DriverAssigned'
                     AND d.version > coalesce(p.known_version, 0)
), created AS (
    INSERT INTO read_model_orders (order_id, user_id, restaurant_id, status, items, total_amount, delivery_address,
                                   created_at, updated_at, current_version, user_name, restaurant_name, driver_name,
                                   estimated_delivery)
    SELECT order_id, (created ->> 'user_id')::bigint, (confirmed ->> 'restaurant_id')::bigint,
           pgprojector_order_status(last_type), created -> 'items', round((created ->> 'total_amount')::numeric, 2),
           created ->> 'delivery_address', created_at, updated_at, last_version, created ->> 'user_name',
           confirmed ->> 'restaurant_name', driver ->> 'driver_name', (confirmed ->> 'estimated_delivery')::timestamptz
    FROM folded WHERE known_version IS NULL
    RETURNING 1
), updated AS (
    UPDATE read_model_orders t SET
        status = pgprojector_order_status(p.last_type),
        updated_at = p.updated_at,
        current_version = p.last_version,
        restaurant_id = coalesce((p.confirmed ->> 'restaurant_id')::bigint, t.restaurant_id),
        restaurant_name = coalesce(p.confirmed ->> 'restaurant_name', t.restaurant_name),
        estimated_delivery = coalesce((p.confirmed ->> 'estimated_delivery')::timestamptz, t.estimated_delivery),
        driver_name = coalesce(p.driver ->> 'driver_name', t.driver_name)
    FROM folded p
    WHERE p.order_id = t.order_id AND p.known_version IS NOT NULL
      AND t.order_id = ANY (ARRAY(SELECT order_id FROM folded WHERE known_version IS NOT NULL))
    RETURNING 1
)
SELECT count(*) FROM batch

-- name: dashboard_summary
-- (valid data only: `ok` vouches for the amount of an event that passes; the verdict names the others)
, max(round((data ->> 'total_amount')::numeric, 2)) FILTER (WHERE event_type = 'OrderCreated' AND ok) AS amount

-- name: dashboard_known
, t.status AS known_status, t.total_amount AS known_amount

-- name: dashboard_apply
WITH {checked_batch}, moved AS MATERIALIZED (
    SELECT p.order_id, p.known_version, p.last_version, p.known_status, p.known_amount,
           pgprojector_order_status(l.event_type) AS status, coalesce(p.known_amount, p.amount) AS amount
    FROM changed p JOIN batch l ON l.position = p.last_position AND l.version = p.last_version
), remembered AS (
    -- The checkpoint's row lock makes this transaction the projection's only writer: a plain
    -- INSERT for the orders it has not seen, an UPDATE for the others.
    INSERT INTO projection_dashboard_orders (order_id, status, total_amount, version)
    SELECT order_id, status, amount, last_version FROM moved WHERE known_version IS NULL
    RETURNING 1
), updated AS (
    UPDATE projection_dashboard_orders s SET status = m.status, version = m.last_version
    FROM moved m WHERE s.order_id = m.order_id AND m.known_version IS NOT NULL
      AND s.order_id = ANY (ARRAY(SELECT order_id FROM moved WHERE known_version IS NOT NULL))
    RETURNING 1
), deltas AS (
    SELECT status, sum(n) AS n, sum(amount) AS amount FROM (
        SELECT known_status AS status, -1 AS n, -known_amount AS amount FROM moved WHERE known_version IS NOT NULL
        UNION ALL
        SELECT status, 1, amount FROM moved
    ) d GROUP BY status
), counted AS (
    INSERT INTO read_model_dashboard AS d (status, order_count, total_amount)
    SELECT status, n, amount FROM deltas WHERE n <> 0 OR amount <> 0
    ON CONFLICT (status) DO UPDATE SET
        order_count = d.order_count + EXCLUDED.order_count, total_amount = d.total_amount + EXCLUDED.total_amount
    RETURNING 1
)
SELECT count(*) FROM batch

-- name: dashboard_drop_empty
DELETE FROM read_model_dashboard WHERE order_count = 0

-- name: analytics_summary
, max(round((data ->> 'total_amount')::numeric, 2)) FILTER (WHERE event_type = 'OrderCreated' AND ok) AS amount,
  count(*) FILTER (WHERE event_type = 'OrderConfirmed') AS confirmations,
  max(version) FILTER (WHERE event_type = 'OrderConfirmed') AS confirmed_version,
  -- that confirmation's restaurant while it is the batch's only one (analytics_apply looks up the others)
  max((data ->> 'restaurant_id')::bigint) FILTER (WHERE event_type = 'OrderConfirmed' AND ok) AS confirmed_restaurant

-- name: analytics_known
, t.total_amount AS known_amount, t.restaurant_id AS known_restaurant

-- name: analytics_apply
-- An event counts for the restaurant of the order's latest OrderConfirmed at or below its version:
-- the one in the batch (the usual case, read off the summary), an earlier one of several in the
-- batch (looked up by (aggregate_id, version) in the log), or the one applied before the batch.
WITH {checked_batch}, counting AS (
    SELECT e.event_type, e.created_at, coalesce(p.known_amount, p.amount) AS amount, CASE
               WHEN p.confirmations = 0 OR p.confirmed_version <= coalesce(p.known_version, 0) THEN p.known_restaurant
               WHEN p.confirmations = 1 THEN
                   CASE WHEN e.version >= p.confirmed_version THEN p.confirmed_restaurant ELSE p.known_restaurant END
               ELSE coalesce((
                   SELECT (c.data ->> 'restaurant_id')::bigint FROM events c
                   WHERE c.aggregate_id = e.aggregate_id AND c.event_type = 'OrderConfirmed' AND c.version <= e.version
                     AND c.version >= p.first_version AND c.version > coalesce(p.known_version, 0)
                   ORDER BY c.version DESC LIMIT 1), p.known_restaurant)
           END AS restaurant_id
    FROM batch e JOIN changed p USING (aggregate_id)
    WHERE e.event_type IN ('OrderConfirmed', 'OrderDelivered', 'OrderCancelled')
      AND e.version > coalesce(p.known_version, 0)
), counted AS (
    INSERT INTO read_model_restaurant_daily AS r (restaurant_id, day, confirmed, delivered, cancelled, revenue)
    SELECT restaurant_id, (created_at AT TIME ZONE 'UTC')::date,
           count(*) FILTER (WHERE event_type = 'OrderConfirmed'),
           count(*) FILTER (WHERE event_type = 'OrderDelivered'),
           count(*) FILTER (WHERE event_type = 'OrderCancelled'),
           coalesce(sum(amount) FILTER (WHERE event_type = 'OrderDelivered'), 0)
    FROM counting
    WHERE restaurant_id IS NOT NULL
    GROUP BY 1, 2
    ON CONFLICT (restaurant_id, day) DO UPDATE SET
        confirmed = r.confirmed + EXCLUDED.confirmed, delivered = r.delivered + EXCLUDED.delivered,
        cancelled = r.cancelled + EXCLUDED.cancelled, revenue = r.revenue + EXCLUDED.revenue
    RETURNING 1
), restaurants AS MATERIALIZED (
    -- Each changed order's restaurant as the batch leaves it.
    SELECT order_id, known_version, last_version, amount, CASE
               WHEN confirmations = 0 OR confirmed_version <= coalesce(known_version, 0) THEN known_restaurant
               WHEN confirmations = 1 THEN confirmed_restaurant
               ELSE (SELECT (c.data ->> 'restaurant_id')::bigint FROM events c
                     WHERE c.aggregate_id = p.aggregate_id AND c.version = p.confirmed_version)
           END AS restaurant_id
    FROM changed p
), remembered AS (
    -- As in dashboard_apply: the checkpoint's row lock makes this the projection's only writer.
    INSERT INTO projection_analytics_orders (order_id, total_amount, restaurant_id, version)
    SELECT order_id, amount, restaurant_id, last_version FROM restaurants WHERE known_version IS NULL
    RETURNING 1
), updated AS (
    UPDATE projection_analytics_orders s SET restaurant_id = r.restaurant_id, version = r.last_version
    FROM restaurants r
    WHERE s.order_id = r.order_id AND r.known_version IS NOT NULL
      AND s.order_id = ANY (ARRAY(SELECT order_id FROM restaurants WHERE known_version IS NOT NULL))
    RETURNING 1
)
SELECT count(*) FROM batch
