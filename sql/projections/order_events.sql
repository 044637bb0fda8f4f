-- Validation of the order aggregate's events (CONTRACT.md), shared by the three built-in projections.
-- Plain SQL functions, inlined by the planner: a batch is checked in one set-based query.
--
-- Every projection needs the order's number, from aggregate_id (order_<number>), and checks the
-- data fields it reads, named in `fields` (order_id among them: it must match the aggregate), and
-- no others: a tolerant reader, which a field it never reads cannot stop. `fields` is always a
-- constant in the calling statement, so the planner folds the `= ANY(fields)` tests away and each
-- projection runs only its own checks.

-- Cheap where it can be: a batch validates thousands of events per statement.
-- An id: a non-negative integer below 10^18, as a JSON number or as a string of digits (JavaScript
-- producers write 64-bit ids as strings). A JSON number prints as digits only exactly when it is a
-- non-negative integer (1.0 prints "1.0").
CREATE OR REPLACE FUNCTION pgprojector_is_id(value JSONB) RETURNS BOOLEAN
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(CASE jsonb_typeof(value) WHEN 'number' THEN value::text WHEN 'string' THEN value #>> '{}' END
                    ~ '^[0-9]{1,18}$', false)
$$;

-- pgprojector_is_id of the value `data ->> key` reads (which prints a number and unquotes a
-- string), without a regular expression: digits map to '9', and the result is one of 18 shapes.
-- An array, object or boolean prints as no such shape; JSON null reads as NULL.
CREATE OR REPLACE FUNCTION pgprojector_is_id_text(value TEXT) RETURNS BOOLEAN
LANGUAGE sql IMMUTABLE AS $$
    SELECT translate(value, '0123456789', '9999999999') IN (
        '9', '99', '999', '9999', '99999', '999999', '9999999', '99999999', '999999999', '9999999999',
        '99999999999', '999999999999', '9999999999999', '99999999999999', '999999999999999',
        '9999999999999999', '99999999999999999', '999999999999999999')
$$;

-- Replaced by pgprojector_is_id_text: leave no stale function behind.
DROP FUNCTION IF EXISTS pgprojector_is_id_fast(JSONB);

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

-- aggregate_id is order_ and the order number, 1 to 18 digits (a bigint) with no leading zero,
-- whatever the event. One number, one spelling: order_07 would be a second stream of versions
-- for order 7, beside order_7's. Evaluated once per order of every batch: one rtrim() (what is
-- left of it once the trailing digits are gone must be the prefix) and byte counts, about 40%
-- cheaper than taking the suffix apart with left(), substr() and ltrim().
CREATE OR REPLACE FUNCTION pgprojector_is_order_aggregate(aggregate_id TEXT) RETURNS BOOLEAN
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(rtrim(aggregate_id, '0123456789') = 'order_' AND octet_length(aggregate_id) BETWEEN 7 AND 24
                    AND aggregate_id NOT LIKE 'order\_0_%', false)
$$;

-- Before `fields`, every projection checked every field: drop that signature, leave no stale overload.
DROP FUNCTION IF EXISTS pgprojector_order_event_problem(TEXT, TEXT, JSONB);

-- Why an order event does not validate for a projection reading `fields`, or NULL. Used to name
-- the problem once an event has failed pgprojector_order_event_ok, its fast twin.
CREATE OR REPLACE FUNCTION pgprojector_order_event_problem(aggregate_id TEXT, event_type TEXT, data JSONB,
                                                           fields TEXT[])
RETURNS TEXT LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN 'order_id' = ANY(fields) AND jsonb_typeof(data) <> 'object' THEN 'data is not a JSON object'
        WHEN 'order_id' = ANY(fields) AND NOT pgprojector_is_id(data -> 'order_id')
            THEN 'order_id: not a non-negative integer'
        WHEN 'order_id' = ANY(fields) AND aggregate_id <> 'order_' || (data ->> 'order_id')
            THEN 'order_id ' || (data ->> 'order_id') || ' does not match the aggregate'
        WHEN NOT pgprojector_is_order_aggregate(aggregate_id) THEN 'aggregate_id: not order_<order_id>'
        WHEN event_type = 'OrderCreated' THEN coalesce(
            CASE WHEN 'user_id' = ANY(fields) AND NOT pgprojector_is_id(data -> 'user_id')
                 THEN 'user_id: not a non-negative integer' END,
            CASE WHEN 'user_name' = ANY(fields) AND NOT pgprojector_is_text(data -> 'user_name', 100)
                 THEN 'user_name: not a string of at most 100 characters' END,
            CASE WHEN 'items' = ANY(fields) AND coalesce(jsonb_typeof(data -> 'items'), '') <> 'array'
                 THEN 'items: not a JSON array' END,
            CASE WHEN 'total_amount' = ANY(fields) AND pgprojector_money(data -> 'total_amount') IS NULL
                 THEN 'total_amount: not a decimal >= 0 with at most 2 decimals, below 100000000' END,
            CASE WHEN 'delivery_address' = ANY(fields) AND NOT pgprojector_is_text(data -> 'delivery_address', NULL)
                 THEN 'delivery_address: not a string' END)
        WHEN event_type = 'OrderConfirmed' THEN coalesce(
            CASE WHEN 'restaurant_id' = ANY(fields) AND NOT pgprojector_is_id(data -> 'restaurant_id')
                 THEN 'restaurant_id: not a non-negative integer' END,
            CASE WHEN 'restaurant_name' = ANY(fields) AND NOT pgprojector_is_text(data -> 'restaurant_name', 100)
                 THEN 'restaurant_name: not a string of at most 100 characters' END,
            CASE WHEN 'estimated_delivery' = ANY(fields) AND NOT pgprojector_is_zoned_time(data -> 'estimated_delivery')
                 THEN 'estimated_delivery: not an ISO 8601 time with a zone' END)
        WHEN event_type = 'DriverAssigned' THEN coalesce(
            CASE WHEN 'driver_id' = ANY(fields) AND NOT pgprojector_is_id(data -> 'driver_id')
                 THEN 'driver_id: not a non-negative integer' END,
            CASE WHEN 'driver_name' = ANY(fields) AND NOT pgprojector_is_text(data -> 'driver_name', 100)
                 THEN 'driver_name: not a string of at most 100 characters' END)
        WHEN event_type = 'OrderCancelled' AND 'reason' = ANY(fields) AND NOT pgprojector_is_text(data -> 'reason', NULL)
            THEN 'reason: not a string'
    END
$$;

-- pgprojector_order_event_ok (below) is exactly `pgprojector_order_event_problem(...) IS NULL`, several
-- times cheaper: a batch checks every event with it and asks the slow twin only about an event it
-- refuses. No regular expressions on the usual shapes: digits are mapped to '9' by translate() and
-- the result looked up among the common shapes (a hashed IN list); anything else falls back to the
-- slow check. tests/test_validation.py holds the two to the same verdict over a corpus of good and
-- bad events. This is its part without the check of aggregate_id itself, which a batch makes once
-- per order instead of once per event.
CREATE OR REPLACE FUNCTION pgprojector_order_data_ok(aggregate_id TEXT, event_type TEXT, data JSONB, fields TEXT[])
RETURNS BOOLEAN LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(
        -- Where aggregate_id is order_<number>, this equality makes order_id read as its digits:
        -- an id (a number that is a non-negative integer, or a string of digits).
        (NOT 'order_id' = ANY(fields) OR 'order_' || (data ->> 'order_id') = aggregate_id)
        AND CASE event_type
            WHEN 'OrderCreated' THEN
                (NOT 'user_id' = ANY(fields) OR pgprojector_is_id_text(data ->> 'user_id'))
                AND (NOT 'user_name' = ANY(fields) OR jsonb_typeof(data -> 'user_name') = 'string'
                    AND (octet_length(data ->> 'user_name') <= 100 OR length(data ->> 'user_name') <= 100))
                AND (NOT 'items' = ANY(fields) OR jsonb_typeof(data -> 'items') = 'array')
                AND (NOT 'delivery_address' = ANY(fields) OR jsonb_typeof(data -> 'delivery_address') = 'string')
                -- ->> prints a JSON number and unquotes a string: one shape for both, and none matches an
                -- array, object or boolean.
                AND (NOT 'total_amount' = ANY(fields) OR CASE
                    WHEN translate(data ->> 'total_amount', '0123456789', '9999999999') IN (
                        '9', '9.9', '9.99', '99', '99.9', '99.99', '999', '999.9',
                        '999.99', '9999', '9999.9', '9999.99', '99999', '99999.9', '99999.99', '999999',
                        '999999.9', '999999.99', '9999999', '9999999.9', '9999999.99', '99999999', '99999999.9', '99999999.99') THEN true
                    ELSE pgprojector_money(data -> 'total_amount') IS NOT NULL END)
            WHEN 'OrderConfirmed' THEN
                (NOT 'restaurant_id' = ANY(fields) OR pgprojector_is_id_text(data ->> 'restaurant_id'))
                AND (NOT 'restaurant_name' = ANY(fields) OR jsonb_typeof(data -> 'restaurant_name') = 'string'
                    AND (octet_length(data ->> 'restaurant_name') <= 100 OR length(data ->> 'restaurant_name') <= 100))
                AND (NOT 'estimated_delivery' = ANY(fields) OR CASE
                    -- (no JSON number prints with '-' and ':', so ->> unquoting a string is enough)
                    WHEN translate(data ->> 'estimated_delivery', '0123456789', '9999999999') IN (
                        '9999-99-99T99:99:99+99:99', '9999-99-99T99:99:99-99:99', '9999-99-99T99:99:99Z')
                        THEN true
                    ELSE pgprojector_is_zoned_time(data -> 'estimated_delivery') END)
            WHEN 'DriverAssigned' THEN
                (NOT 'driver_id' = ANY(fields) OR pgprojector_is_id_text(data ->> 'driver_id'))
                AND (NOT 'driver_name' = ANY(fields) OR jsonb_typeof(data -> 'driver_name') = 'string'
                    AND (octet_length(data ->> 'driver_name') <= 100 OR length(data ->> 'driver_name') <= 100))
            WHEN 'OrderCancelled' THEN NOT 'reason' = ANY(fields) OR jsonb_typeof(data -> 'reason') = 'string'
            ELSE true
        END, false)
$$;

CREATE OR REPLACE FUNCTION pgprojector_order_event_ok(aggregate_id TEXT, event_type TEXT, data JSONB, fields TEXT[])
RETURNS BOOLEAN LANGUAGE sql IMMUTABLE AS $$
    SELECT pgprojector_is_order_aggregate(aggregate_id) AND pgprojector_order_data_ok(aggregate_id, event_type, data, fields)
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

-- Ends an optimistic apply statement (queries.sql, optimistic_check_verdict) that is not sure of its
-- batch; the worker's apply runs the full check instead.
CREATE OR REPLACE FUNCTION pgprojector_doubt_batch(event_position BIGINT) RETURNS BOOLEAN
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the batch needs the full check, from position %', event_position
        USING ERRCODE = 'data_exception';
END
$$;
