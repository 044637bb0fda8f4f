-- Validation of the order aggregate's events (CONTRACT.md), shared by the three built-in projections.
-- Plain SQL functions, inlined by the planner: a batch is checked in one set-based query.

-- Cheap where it can be: a batch validates thousands of events per statement.
CREATE OR REPLACE FUNCTION pgprojector_is_id(value JSONB) RETURNS BOOLEAN
LANGUAGE sql IMMUTABLE AS $$
    -- A JSON number prints as digits only exactly when it is a non-negative integer (1.0 prints "1.0").
    SELECT coalesce(value::text ~ '^[0-9]{1,18}$', false)
$$;

CREATE OR REPLACE FUNCTION pgprojector_is_text(value JSONB, max_length INTEGER) RETURNS BOOLEAN
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(value) = 'string'
                THEN max_length IS NULL OR length(value #>> '{}') <= max_length
                ELSE false END
$$;

-- A decimal amount, as a JSON string or number: >= 0, at most 2 decimals, fits DECIMAL(10,2); else NULL.
CREATE OR REPLACE FUNCTION pgprojector_amount(value NUMERIC) RETURNS NUMERIC
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN value >= 0 AND value < 100000000 AND value = round(value, 2) THEN round(value, 2) END
$$;

CREATE OR REPLACE FUNCTION pgprojector_money(value JSONB) RETURNS NUMERIC
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        -- The usual shapes ("12.50", 12.5), recognised from the printed value in one match.
        WHEN value::text ~ '^("[0-9]{1,8}(\.[0-9]{1,2})?"|[0-9]{1,8}(\.[0-9]{1,2})?)$'
            THEN round((value #>> '{}')::numeric, 2)
        WHEN jsonb_typeof(value) = 'number' THEN pgprojector_amount(value::numeric)
        WHEN jsonb_typeof(value) = 'string' AND (value #>> '{}') ~ '^[0-9]{1,12}(\.[0-9]{1,12})?$'
            THEN pgprojector_amount((value #>> '{}')::numeric)
    END
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

-- Stops the batch's statement at its first bad event, naming it; the worker then retries, isolates,
-- halts or parks it like any handler error.
CREATE OR REPLACE FUNCTION pgprojector_reject_order_event(event_position BIGINT, aggregate_id TEXT,
                                                          event_type TEXT, version BIGINT, problem TEXT)
RETURNS BOOLEAN LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% at position % (% v%): %', event_type, event_position, aggregate_id, version, problem
        USING ERRCODE = 'data_exception';
END
$$;
