-- Validation of the order aggregate's events (CONTRACT.md), shared by the three built-in projections.
-- Plain SQL functions, inlined by the planner: a batch is checked in one set-based query.

CREATE OR REPLACE FUNCTION pgprojector_is_id(value JSONB) RETURNS BOOLEAN
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(jsonb_typeof(value) = 'number' AND value::text ~ '^[0-9]{1,18}$', false)
$$;

CREATE OR REPLACE FUNCTION pgprojector_is_text(value JSONB, max_length INTEGER) RETURNS BOOLEAN
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(jsonb_typeof(value) = 'string' AND (max_length IS NULL OR length(value #>> '{}') <= max_length),
                    false)
$$;

-- A decimal amount, as a JSON string or number: >= 0, at most 2 decimals, fits DECIMAL(10,2); else NULL.
CREATE OR REPLACE FUNCTION pgprojector_money(value JSONB) RETURNS NUMERIC
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(value) IN ('string', 'number') AND (value #>> '{}') ~ '^[0-9]{1,12}(\.[0-9]{1,12})?$'
                 AND (value #>> '{}')::numeric = round((value #>> '{}')::numeric, 2)
                 AND (value #>> '{}')::numeric < 100000000
                THEN round((value #>> '{}')::numeric, 2) END
$$;

-- ISO 8601 with a zone: 2026-05-01T12:30:00+02:00, ...Z
CREATE OR REPLACE FUNCTION pgprojector_is_zoned_time(value JSONB) RETURNS BOOLEAN
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(jsonb_typeof(value) = 'string' AND (value #>> '{}')
        ~ '^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|z|[+-]\d{2}(:?\d{2})?)$', false)
$$;

-- Why an order event's data does not validate, or NULL.
CREATE OR REPLACE FUNCTION pgprojector_order_event_problem(aggregate_id TEXT, event_type TEXT, data JSONB)
RETURNS TEXT LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN jsonb_typeof(data) <> 'object' THEN 'data is not a JSON object'
        WHEN NOT pgprojector_is_id(data -> 'order_id') THEN 'order_id: not a non-negative integer'
        WHEN aggregate_id <> 'order_' || (data ->> 'order_id')
            THEN 'order_id ' || (data ->> 'order_id') || ' does not match the aggregate'
        WHEN event_type = 'OrderCreated' THEN coalesce(
            CASE WHEN NOT pgprojector_is_id(data -> 'user_id') THEN 'user_id: not a non-negative integer' END,
            CASE WHEN NOT pgprojector_is_text(data -> 'user_name', 100) THEN 'user_name: not a string of at most 100 characters' END,
            CASE WHEN coalesce(jsonb_typeof(data -> 'items'), '') <> 'array' THEN 'items: not a JSON array' END,
            CASE WHEN pgprojector_money(data -> 'total_amount') IS NULL
                 THEN 'total_amount: not a decimal >= 0 with at most 2 decimals, below 100000000' END,
            CASE WHEN NOT pgprojector_is_text(data -> 'delivery_address', NULL) THEN 'delivery_address: not a string' END)
        WHEN event_type = 'OrderConfirmed' THEN coalesce(
            CASE WHEN NOT pgprojector_is_id(data -> 'restaurant_id') THEN 'restaurant_id: not a non-negative integer' END,
            CASE WHEN NOT pgprojector_is_text(data -> 'restaurant_name', 100) THEN 'restaurant_name: not a string of at most 100 characters' END,
            CASE WHEN NOT pgprojector_is_zoned_time(data -> 'estimated_delivery')
                 THEN 'estimated_delivery: not an ISO 8601 time with a zone' END)
        WHEN event_type = 'DriverAssigned' THEN coalesce(
            CASE WHEN NOT pgprojector_is_id(data -> 'driver_id') THEN 'driver_id: not a non-negative integer' END,
            CASE WHEN NOT pgprojector_is_text(data -> 'driver_name', 100) THEN 'driver_name: not a string of at most 100 characters' END)
        WHEN event_type = 'OrderCancelled' AND NOT pgprojector_is_text(data -> 'reason', NULL) THEN 'reason: not a string'
    END
$$;

CREATE OR REPLACE FUNCTION pgprojector_order_status(event_type TEXT) RETURNS VARCHAR
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE event_type
        WHEN 'OrderCreated' THEN 'created' WHEN 'OrderConfirmed' THEN 'confirmed'
        WHEN 'DriverAssigned' THEN 'driver_assigned' WHEN 'OrderPickedUp' THEN 'picked_up'
        WHEN 'OrderDelivered' THEN 'delivered' WHEN 'OrderCancelled' THEN 'cancelled' END
$$;

-- The first event in (after, upto] of `types` that a projection keeping its per-order version in
-- state_table.version_column cannot apply, and why; no row when the whole range is good. Events
-- at or below the version already applied are replays and change nothing, so they are never bad.
CREATE OR REPLACE FUNCTION pgprojector_first_bad_order_event(
    after BIGINT, upto BIGINT, types TEXT[], state_table REGCLASS, version_column NAME,
    OUT event_position BIGINT, OUT event_aggregate_id TEXT, OUT event_type_name TEXT, OUT event_version BIGINT,
    OUT problem TEXT)
RETURNS SETOF RECORD LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY EXECUTE format($query$
        WITH batch AS (
            SELECT e.position, e.aggregate_id::text AS aggregate_id, e.event_type::text AS event_type, e.version,
                   e.data, pgprojector_order_event_problem(e.aggregate_id, e.event_type, e.data) AS problem
            FROM events e
            WHERE e.position > $1 AND e.position <= $2 AND e.aggregate_type = 'order' AND e.event_type = ANY($3)
        ), judged AS (
            SELECT b.*, s.%2$I AS known_version,
                   coalesce(bool_or(b.event_type = 'OrderCreated') OVER (PARTITION BY b.aggregate_id ORDER BY b.position
                            ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), false) AS created_earlier
            FROM batch b
            LEFT JOIN %1$s s ON s.order_id = CASE WHEN b.problem IS NULL THEN (b.data ->> 'order_id')::bigint END
        )
        SELECT j.position, j.aggregate_id, j.event_type, j.version, j.problem FROM (
            SELECT judged.position, judged.aggregate_id, judged.event_type, judged.version, CASE
                WHEN judged.problem IS NOT NULL THEN judged.problem
                WHEN known_version IS NOT NULL AND judged.version <= known_version THEN NULL
                WHEN judged.event_type = 'OrderCreated' AND (known_version IS NOT NULL OR created_earlier)
                    THEN 'the order exists already'
                WHEN judged.event_type <> 'OrderCreated' AND known_version IS NULL AND NOT created_earlier
                    THEN 'no OrderCreated applied for this order'
            END AS problem FROM judged) j
        WHERE j.problem IS NOT NULL
        ORDER BY j.position
        LIMIT 1
    $query$, state_table, version_column) USING after, upto, types;
END
$$;
