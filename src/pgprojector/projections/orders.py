"""read_model_orders: one row per order, its latest state."""

from pgprojector.projections.order_events import ORDER_EVENT_TYPES, ORDER_FIELDS, order_projection

projection = order_projection(
    "orders",
    event_types=ORDER_EVENT_TYPES,
    state_table="read_model_orders",
    reads=ORDER_FIELDS,
    version_column="current_version",
    tables=("read_model_orders",),
)
