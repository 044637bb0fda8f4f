-- Per restaurant and UTC day: confirmations, deliveries, cancellations after confirmation, revenue.
CREATE TABLE IF NOT EXISTS read_model_restaurant_daily (
    restaurant_id BIGINT,
    day DATE,
    confirmed BIGINT,
    delivered BIGINT,
    cancelled BIGINT,
    revenue DECIMAL(14,2),
    PRIMARY KEY (restaurant_id, day)
);

-- The analytics projection's own memory of each order: its amount (from OrderCreated)
-- and the restaurant that confirmed it.
CREATE TABLE IF NOT EXISTS projection_analytics_orders (
    order_id BIGINT PRIMARY KEY,
    total_amount DECIMAL(10,2) NOT NULL,
    restaurant_id BIGINT,
    version BIGINT NOT NULL
);
