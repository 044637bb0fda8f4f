-- The orders read model: exactly the seed's columns, types and indexes.
CREATE TABLE IF NOT EXISTS read_model_orders (
    order_id BIGINT PRIMARY KEY,
    user_id BIGINT NOT NULL,
    restaurant_id BIGINT,
    status VARCHAR(50) NOT NULL,
    items JSONB NOT NULL,
    total_amount DECIMAL(10,2),
    delivery_address TEXT,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    current_version BIGINT NOT NULL,
    user_name VARCHAR(100),
    restaurant_name VARCHAR(100),
    driver_name VARCHAR(100),
    estimated_delivery TIMESTAMPTZ
);

CREATE INDEX IF NOT EXISTS idx_orders_user ON read_model_orders (user_id);
CREATE INDEX IF NOT EXISTS idx_orders_status ON read_model_orders (status);
CREATE INDEX IF NOT EXISTS idx_orders_created ON read_model_orders (created_at DESC);
