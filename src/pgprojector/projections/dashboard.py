"""read_model_dashboard: how many orders are in each status right now, and their total.

It remembers each order's status and amount in its own projection_dashboard_orders: moving an
order between statuses needs both, and no projection reads another's tables.
"""

from pgprojector.projections.order_events import ORDER_EVENT_TYPES, order_projection

projection = order_projection(
    "dashboard",
    event_types=ORDER_EVENT_TYPES,
    state_table="projection_dashboard_orders",
    reads=("total_amount",),
    version_column="version",
    tables=("read_model_dashboard", "projection_dashboard_orders"),
    then=("dashboard_drop_empty",),
)
