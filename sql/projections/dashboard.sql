-- Orders currently in each status, and their total.
CREATE TABLE IF NOT EXISTS read_model_dashboard (
    status VARCHAR(50) PRIMARY KEY,
    order_count BIGINT NOT NULL,
    total_amount DECIMAL(14,2) NOT NULL
);

-- The dashboard's own memory of each order (it never reads another projection's tables):
-- moving an order between statuses needs its previous status and its amount.
CREATE TABLE IF NOT EXISTS projection_dashboard_orders (
    order_id BIGINT PRIMARY KEY,
    status VARCHAR(50) NOT NULL,
    total_amount DECIMAL(10,2) NOT NULL,
    version BIGINT NOT NULL
);
