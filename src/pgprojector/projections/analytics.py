"""read_model_restaurant_daily: per restaurant and UTC day, confirmations, deliveries, cancellations, revenue.

It remembers each order's amount (from OrderCreated) and confirming restaurant in its own
projection_analytics_orders. DriverAssigned and OrderPickedUp change nothing here.
"""

from pgprojector.projections.order_events import order_projection

projection = order_projection(
    "analytics",
    event_types=frozenset({"OrderCreated", "OrderConfirmed", "OrderDelivered", "OrderCancelled"}),
    state_table="projection_analytics_orders",
    reads=("total_amount", "restaurant_id"),
    version_column="version",
    tables=("read_model_restaurant_daily", "projection_analytics_orders"),
)
