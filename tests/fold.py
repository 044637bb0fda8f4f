"""An independent fold of the whole log into the read models CONTRACT.md describes.

Written from the contract's words, sharing no code with pgprojector.projections, so that a
comparison with the daemon's tables checks the daemon rather than itself.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg

STATUS = {"OrderCreated": "created", "OrderConfirmed": "confirmed", "DriverAssigned": "driver_assigned",
          "OrderPickedUp": "picked_up", "OrderDelivered": "delivered", "OrderCancelled": "cancelled"}


async def fold(conn: asyncpg.Connection) -> dict[str, Any]:
    orders: dict[int, dict[str, Any]] = {}
    daily: defaultdict[tuple[int, Any], list[Any]] = defaultdict(lambda: [0, 0, 0, Decimal("0.00")])
    restaurant_of: dict[int, int] = {}
    rows = await conn.fetch("SELECT aggregate_type, event_type, data, version, created_at FROM events "
                            "ORDER BY aggregate_id, version")
    for row in rows:
        if row["aggregate_type"] != "order" or row["event_type"] not in STATUS:
            continue
        data, kind = row["data"], row["event_type"]
        order_id = int(data["order_id"])
        if kind == "OrderCreated":
            orders[order_id] = {"user_id": data["user_id"], "total_amount": Decimal(str(data["total_amount"])),
                                "restaurant_id": None, "restaurant_name": None, "driver_name": None,
                                "created_at": row["created_at"]}
        order = orders[order_id]
        order.update(status=STATUS[kind], current_version=row["version"], updated_at=row["created_at"])
        day = row["created_at"].astimezone(UTC).date()
        if kind == "OrderConfirmed":
            order.update(restaurant_id=data["restaurant_id"], restaurant_name=data["restaurant_name"],
                         estimated_delivery=datetime.fromisoformat(data["estimated_delivery"]))
            restaurant_of[order_id] = data["restaurant_id"]
            daily[(data["restaurant_id"], day)][0] += 1
        elif kind == "DriverAssigned":
            order["driver_name"] = data["driver_name"]
        elif kind == "OrderDelivered" and order_id in restaurant_of:
            daily[(restaurant_of[order_id], day)][1] += 1
            daily[(restaurant_of[order_id], day)][3] += order["total_amount"]
        elif kind == "OrderCancelled" and order_id in restaurant_of:
            daily[(restaurant_of[order_id], day)][2] += 1
    dashboard: defaultdict[str, list[Any]] = defaultdict(lambda: [0, Decimal("0.00")])
    for order in orders.values():
        dashboard[order["status"]][0] += 1
        dashboard[order["status"]][1] += order["total_amount"]
    return {
        "orders": {order_id: {key: order[key] for key in ORDER_COLUMNS} for order_id, order in orders.items()},
        "dashboard": {status: tuple(values) for status, values in dashboard.items()},
        "daily": {key: tuple(values) for key, values in daily.items()},
    }


ORDER_COLUMNS = ("user_id", "status", "total_amount", "restaurant_id", "restaurant_name", "driver_name",
                 "created_at", "updated_at", "current_version")


async def read_models(conn: asyncpg.Connection) -> dict[str, Any]:
    orders = {r["order_id"]: {key: r[key] for key in ORDER_COLUMNS}
              for r in await conn.fetch("SELECT * FROM read_model_orders")}
    dashboard = {r["status"]: (r["order_count"], r["total_amount"])
                 for r in await conn.fetch("SELECT * FROM read_model_dashboard")}
    daily = {(r["restaurant_id"], r["day"]): (r["confirmed"], r["delivered"], r["cancelled"], r["revenue"])
             for r in await conn.fetch("SELECT * FROM read_model_restaurant_daily")}
    return {"orders": orders, "dashboard": dashboard, "daily": daily}


async def assert_read_models_match_fold(conn: asyncpg.Connection) -> None:
    expected, actual = await fold(conn), await read_models(conn)
    for model in ("dashboard", "daily", "orders"):
        assert actual[model] == expected[model], f"{model} differs from the fold of the log"
