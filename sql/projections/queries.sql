-- Set-based writes of the built-in projections: one statement per table per batch.

-- name: orders_load
SELECT order_id, user_id, restaurant_id, status, items, total_amount, delivery_address, created_at,
       updated_at, current_version, user_name, restaurant_name, driver_name, estimated_delivery
FROM read_model_orders WHERE order_id = ANY($1::bigint[])

-- name: orders_upsert
INSERT INTO read_model_orders (order_id, user_id, restaurant_id, status, items, total_amount, delivery_address,
                               created_at, updated_at, current_version, user_name, restaurant_name, driver_name,
                               estimated_delivery)
SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::varchar[], $5::jsonb[], $6::numeric[],
                     $7::text[], $8::timestamptz[], $9::timestamptz[], $10::bigint[], $11::varchar[],
                     $12::varchar[], $13::varchar[], $14::timestamptz[])
ON CONFLICT (order_id) DO UPDATE SET
    user_id = EXCLUDED.user_id, restaurant_id = EXCLUDED.restaurant_id, status = EXCLUDED.status,
    items = EXCLUDED.items, total_amount = EXCLUDED.total_amount, delivery_address = EXCLUDED.delivery_address,
    created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at, current_version = EXCLUDED.current_version,
    user_name = EXCLUDED.user_name, restaurant_name = EXCLUDED.restaurant_name,
    driver_name = EXCLUDED.driver_name, estimated_delivery = EXCLUDED.estimated_delivery

-- name: dashboard_load
SELECT order_id, status, total_amount, version FROM projection_dashboard_orders WHERE order_id = ANY($1::bigint[])

-- name: dashboard_upsert_orders
INSERT INTO projection_dashboard_orders (order_id, status, total_amount, version)
SELECT * FROM unnest($1::bigint[], $2::varchar[], $3::numeric[], $4::bigint[])
ON CONFLICT (order_id) DO UPDATE SET
    status = EXCLUDED.status, total_amount = EXCLUDED.total_amount, version = EXCLUDED.version

-- name: dashboard_add
INSERT INTO read_model_dashboard AS d (status, order_count, total_amount)
SELECT * FROM unnest($1::varchar[], $2::bigint[], $3::numeric[])
ON CONFLICT (status) DO UPDATE SET
    order_count = d.order_count + EXCLUDED.order_count, total_amount = d.total_amount + EXCLUDED.total_amount

-- name: dashboard_drop_empty
DELETE FROM read_model_dashboard WHERE order_count = 0

-- name: analytics_load
SELECT order_id, total_amount, restaurant_id, version FROM projection_analytics_orders
WHERE order_id = ANY($1::bigint[])

-- name: analytics_upsert_orders
INSERT INTO projection_analytics_orders (order_id, total_amount, restaurant_id, version)
SELECT * FROM unnest($1::bigint[], $2::numeric[], $3::bigint[], $4::bigint[])
ON CONFLICT (order_id) DO UPDATE SET
    total_amount = EXCLUDED.total_amount, restaurant_id = EXCLUDED.restaurant_id, version = EXCLUDED.version

-- name: analytics_add
INSERT INTO read_model_restaurant_daily AS r (restaurant_id, day, confirmed, delivered, cancelled, revenue)
SELECT * FROM unnest($1::bigint[], $2::date[], $3::bigint[], $4::bigint[], $5::bigint[], $6::numeric[])
ON CONFLICT (restaurant_id, day) DO UPDATE SET
    confirmed = r.confirmed + EXCLUDED.confirmed, delivered = r.delivered + EXCLUDED.delivered,
    cancelled = r.cancelled + EXCLUDED.cancelled, revenue = r.revenue + EXCLUDED.revenue
