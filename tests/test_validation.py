"""The order-event checks in SQL: the fast one a batch runs over every event, and the slow one that
names the problem, must give the same verdict on every event, for every set of fields a projection
reads. A corpus of good events and of each way a field (or the aggregate id) can go wrong, checked
on the real functions.
"""

from __future__ import annotations

import json
from typing import Any

from pgprojector.projections.analytics import projection as analytics
from pgprojector.projections.order_events import ORDER_FIELDS

GOOD: dict[str, dict[str, Any]] = {
    "OrderCreated": {"order_id": 7, "user_id": 12, "user_name": "Ann", "items": [{"sku": "a", "price": "2.50"}],
                     "total_amount": "12.50", "delivery_address": "1 Main St"},
    "OrderConfirmed": {"order_id": 7, "restaurant_id": 3, "restaurant_name": "Pho 1",
                       "estimated_delivery": "2026-05-01T12:30:00+02:00"},
    "DriverAssigned": {"order_id": 7, "driver_id": 9, "driver_name": "Dee"},
    "OrderPickedUp": {"order_id": 7},
    "OrderDelivered": {"order_id": 7},
    "OrderCancelled": {"order_id": 7, "reason": "changed my mind"},
}

MISSING = object()
IDS = [0, 7, 123456789012345678, 1234567890123456789, -1, 1.0, 1.5, 1e2, "7", "007", "123456789012345678",
       "1234567890123456789", "7.0", "-7", " 7", "7a", "", None, True, [7], {"id": 7}, MISSING]
NAMES = ["", "x", "é" * 100, "é" * 101, "a" * 100, "a" * 101, 5, None, ["a"], MISSING]
TEXTS = ["", "anything", 5, None, {"a": 1}, MISSING]
AMOUNTS = ["12.50", "12.5", "12", "0", "0.00", "012.50", "12.500", "12.505", "99999999.99", "100000000", "-1", "abc",
           "1e2", " 12", "12.", ".5", 12.5, 12.50, 12, 0, 1e2, 12.505, -0.5, 99999999.99, 100000000, True, None,
           [1], MISSING]
IMPOSSIBLE_TIMES = ["2026-02-30T10:00:00Z", "2026-02-29T10:00:00Z", "2026-04-31T10:00:00Z", "2026-13-01T10:00:00Z",
                    "2026-00-10T10:00:00Z", "2026-01-00T10:00:00Z", "0000-01-01T00:00:00Z", "2026-01-10T24:00:01Z",
                    "2026-05-01T12:60:00Z", "2026-05-01T12:30:61Z", "2026-05-01T12:30:00+16:00",
                    "2026-05-01T12:30:00+05:60", "2026-13-45T99:99:99+99:99"]
TIMES = ["2026-05-01T12:30:00+02:00", "2026-05-01T12:30:00-05:00", "2026-05-01T12:30:00Z", "2026-05-01T12:30:00z",
         "2026-05-01 12:30:00+02:00", "2026-05-01T12:30+02:00", "2026-05-01T12:30:00.123456+02:00",
         "2026-05-01T12:30:00+0200", "2026-05-01T12:30:00+02", "2026-05-01T12:30:00", "2026-05-01", "tomorrow",
         "2026-5-1T12:30:00Z", 1746095400, None, MISSING,
         # the right shape, some PostgreSQL's cast refuses: the check passes them all, and the orders
         # projection's statement casts every one (test_daemon.py, "right shape")
         *IMPOSSIBLE_TIMES, "2024-02-29T10:00:00Z", "2026-05-31T10:00:00+02:00", "2026-04-30T10:00:00-03:30",
         "2026-12-31T23:59:59+14:00", "2026-01-10T24:00:00Z", "2026-01-10T23:59:60Z", "2026-05-01T12:30:00+15:59",
         "0001-01-01T00:00:00Z"]
ITEMS = [[], [{"sku": "a"}], {"sku": "a"}, "[]", None, MISSING]

FIELD_VALUES: dict[str, list[Any]] = {
    "order_id": IDS, "user_id": IDS, "restaurant_id": IDS, "driver_id": IDS,
    "user_name": NAMES, "restaurant_name": NAMES, "driver_name": NAMES,
    "delivery_address": TEXTS, "reason": TEXTS, "items": ITEMS, "total_amount": AMOUNTS,
    "estimated_delivery": TIMES,
}


def corpus() -> list[tuple[str, str, str]]:
    """(aggregate_id, event_type, data as JSON text): each good event, then one field changed at a time."""
    cases = []
    for event_type, good in GOOD.items():
        cases.append(("order_7", event_type, json.dumps(good)))
        for field in good:
            for value in FIELD_VALUES[field]:
                data = {k: v for k, v in good.items() if k != field}
                if value is not MISSING:
                    data[field] = value
                aggregate = f"order_{value}" if field == "order_id" and isinstance(value, int) else "order_7"
                cases.append((aggregate, event_type, json.dumps(data)))
        for aggregate in ["order_8", "order_07", "order_00", "order_", "Order_7", "order_7 ", " order_7", "order_7é",
                          "order_order_7", "order__7", "order_-7", "x"]:
            cases.append((aggregate, event_type, json.dumps(good)))
        for data in ([7], "order", 7, None):
            cases.append(("order_7", event_type, json.dumps(data)))
    cases.append(("order_7", "OrderRefunded", json.dumps({"order_id": 7})))  # a type no projection knows
    return cases


VERDICTS = """
SELECT c.aggregate_id, c.event_type, c.data::text AS data,
       pgprojector_order_event_ok(c.aggregate_id, c.event_type, c.data, $2::text[]) AS ok,
       pgprojector_order_event_problem(c.aggregate_id, c.event_type, c.data, $2::text[]) AS problem
FROM unnest($1::text[], $3::text[], $4::jsonb[]) AS c(aggregate_id, event_type, data)
"""


async def verdicts(conn, fields: tuple[str, ...]) -> list[Any]:
    cases = corpus()
    return await conn.fetch(VERDICTS, [c[0] for c in cases], list(fields), [c[1] for c in cases],
                            [c[2] for c in cases])


async def test_fast_and_slow_checks_agree_for_every_projection(conn):
    for fields in (ORDER_FIELDS, ("total_amount",), ("total_amount", "restaurant_id"), ("order_id",), ()):
        rows = await verdicts(conn, fields)
        disagree = [dict(r) for r in rows if r["ok"] != (r["problem"] is None)]
        assert not disagree, f"fields {fields}: {disagree[:5]}"
        assert sum(r["ok"] for r in rows) > 20 and sum(not r["ok"] for r in rows) > 20  # the corpus has both


async def test_each_projection_checks_identity_and_the_fields_it_reads(conn):
    async def problem(fields: tuple[str, ...], event_type: str, aggregate: str = "order_7", **changes: Any) -> str | None:
        data = json.dumps({**GOOD[event_type], **changes})
        return await conn.fetchval("SELECT pgprojector_order_event_problem($1, $2, $3::jsonb, $4::text[])",
                                   aggregate, event_type, data, list(fields))

    orders, dashboard = ORDER_FIELDS, ("total_amount",)
    long_name = "a" * 101
    assert await problem(orders, "OrderCreated", user_name=long_name) == \
        "user_name: not a string of at most 100 characters"
    assert await problem(dashboard, "OrderCreated", user_name=long_name) is None  # the dashboard never reads it
    assert await problem(orders, "OrderCreated", user_name="é" * 100) is None  # characters, not bytes
    assert (await problem(dashboard, "OrderCreated", total_amount="12.505")).startswith("total_amount: not a decimal")
    assert (await problem(orders, "OrderConfirmed", estimated_delivery="2026-05-01T12:30:00")).startswith(
        "estimated_delivery: not an ISO 8601 time with a zone")
    # order_id is a field like the others: orders reads it (the row's key), the dashboard does not
    assert await problem(orders, "OrderDelivered", aggregate="order_8") == "order_id 7 does not match the aggregate"
    assert await problem(orders, "OrderDelivered", aggregate="order_1", order_id=1.0) == \
        "order_id: not a non-negative integer"
    assert await problem(dashboard, "OrderDelivered", aggregate="order_8") is None
    # an id may be a JSON number or a string of digits (64-bit ids from JavaScript), nothing else
    assert await problem(orders, "OrderDelivered", order_id="7") is None
    assert await problem(orders, "OrderCreated", user_id="12") is None
    assert await problem(orders, "OrderCreated", user_id="12.0") == "user_id: not a non-negative integer"
    assert await problem(orders, "DriverAssigned", driver_id=" 9") == "driver_id: not a non-negative integer"
    # but every projection takes the order from aggregate_id
    for fields in (orders, dashboard, ()):
        assert await problem(fields, "OrderDelivered", aggregate="order_x", order_id="x") in (
            "aggregate_id: not order_<order_id>", "order_id: not a non-negative integer")
    assert await problem(dashboard, "OrderDelivered", aggregate="order_x") == "aggregate_id: not order_<order_id>"
    # one spelling per order number: order_07 would be a second stream of versions for order 7
    assert await problem(dashboard, "OrderDelivered", aggregate="order_07") == "aggregate_id: not order_<order_id>"
    assert await problem(dashboard, "OrderDelivered", aggregate="order_0") is None
    assert analytics.event_types is not None and "DriverAssigned" not in analytics.event_types
