"""Realistic order lives, as rows for `events` (CONTRACT.md "Events of the order aggregate").

Deterministic for a given seed. Every order starts at a random moment over several days, its
later events follow minutes apart (many lives cross midnight UTC, so analytics' day bucketing is
exercised), and the whole log is ordered by `created_at`, so lives interleave as they would in
production. Amounts are decimal strings; `estimated_delivery` is ISO 8601 with a zone.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

START = datetime(2025, 3, 3, tzinfo=UTC)
DAYS = 7
RESTAURANTS = 400
USERS = 20_000
DRIVERS = 1_500

# (share, the statuses the life goes through after `created`)
LIVES: list[tuple[float, tuple[str, ...]]] = [
    (0.78, ("OrderConfirmed", "DriverAssigned", "OrderPickedUp", "OrderDelivered")),
    (0.08, ("OrderCancelled",)),  # cancelled before confirmation: counts nowhere in analytics
    (0.05, ("OrderConfirmed", "OrderCancelled")),  # cancelled by the restaurant
    (0.02, ("OrderConfirmed", "DriverAssigned", "OrderCancelled")),
    (0.02, ()),  # the rest are still in flight when the log ends
    (0.02, ("OrderConfirmed",)),
    (0.02, ("OrderConfirmed", "DriverAssigned")),
    (0.01, ("OrderConfirmed", "DriverAssigned", "OrderPickedUp")),
]
# Minutes after the previous event.
GAPS = {
    "OrderConfirmed": (0.5, 6), "DriverAssigned": (2, 20), "OrderPickedUp": (5, 25),
    "OrderDelivered": (8, 40), "OrderCancelled": (1, 30),
}
ZONES = [UTC, timezone(timedelta(hours=1)), timezone(timedelta(hours=2)), timezone(timedelta(hours=-5))]
DISHES = ["Margherita", "Pad Thai", "Ramen", "Burrito", "Caesar Salad", "Pho", "Falafel Wrap", "Sushi Set",
          "Butter Chicken", "Cheeseburger", "Poke Bowl", "Lasagne", "Dumplings", "Bibimbap", "Tacos"]
CANCEL_EARLY = ["customer_changed_mind", "payment_failed", "duplicate_order"]
CANCEL_LATE = ["restaurant_closed", "item_unavailable", "no_driver_available", "customer_unreachable"]


@dataclass
class Life:
    """One order's events still to append (for the latency trickle)."""

    order_id: int
    events: list[tuple[str, dict]] = field(default_factory=list)
    next_version: int = 1


class Workload:
    def __init__(self, seed: int = 20250303) -> None:
        self.rng = random.Random(seed)
        first = ["Casa", "Golden", "Little", "Urban", "Blue"]
        second = ["Kitchen", "Wok", "Trattoria", "Grill", "Bistro"]
        self.restaurants = [(i, f"{self.rng.choice(first)} {self.rng.choice(second)} {i}")
                            for i in range(1, RESTAURANTS + 1)]

    def _items(self) -> tuple[list[dict], Decimal]:
        items, total = [], Decimal("2.49")  # delivery fee
        for _ in range(self.rng.choice([1, 1, 2, 2, 2, 3, 3, 4, 5])):
            price = Decimal(self.rng.randrange(350, 2800)) / 100
            quantity = self.rng.choice([1, 1, 1, 2, 2, 3])
            items.append({"item_id": self.rng.randrange(1, 5000), "name": self.rng.choice(DISHES),
                          "quantity": quantity, "unit_price": str(price)})
            total += price * quantity
        return items, total

    def life(self, order_id: int, start: datetime) -> list[tuple[str, dict, datetime]]:
        """(event_type, data, created_at) of one order, in version order."""
        rng = self.rng
        roll, shape = rng.random(), LIVES[-1][1]
        for share, candidate in LIVES:
            if roll < share:
                shape = candidate
                break
            roll -= share
        user_id = rng.randrange(1, USERS + 1)
        items, total = self._items()
        moment = start
        events = [("OrderCreated", {
            "order_id": order_id, "user_id": user_id, "user_name": f"User {user_id}", "items": items,
            "total_amount": str(total),
            "delivery_address": f"{rng.randrange(1, 300)} Example Street, Unit {order_id % 97}",
        }, moment)]
        confirmed = False
        for event_type in shape:
            low, high = GAPS[event_type]
            moment = moment + timedelta(minutes=rng.uniform(low, high))
            if event_type == "OrderConfirmed":
                restaurant_id, restaurant_name = rng.choice(self.restaurants)
                eta = (moment + timedelta(minutes=rng.uniform(20, 60))).astimezone(rng.choice(ZONES))
                data = {"order_id": order_id, "restaurant_id": restaurant_id, "restaurant_name": restaurant_name,
                        "estimated_delivery": eta.isoformat(timespec="seconds")}
                confirmed = True
            elif event_type == "DriverAssigned":
                driver_id = rng.randrange(1, DRIVERS + 1)
                data = {"order_id": order_id, "driver_id": driver_id, "driver_name": f"Driver {driver_id}"}
            elif event_type == "OrderCancelled":
                data = {"order_id": order_id, "reason": rng.choice(CANCEL_LATE if confirmed else CANCEL_EARLY)}
            else:
                data = {"order_id": order_id}
            events.append((event_type, data, moment))
        return events

    def log(self, target_events: int) -> tuple[list[tuple], int]:
        """Records (aggregate_id, aggregate_type, event_type, data JSON, metadata, version, created_at),
        ordered by created_at, about `target_events` of them; and the number of orders."""
        rows: list[tuple] = []
        order_id = 0
        span = DAYS * 86400.0
        while len(rows) < target_events:
            order_id += 1
            start = START + timedelta(seconds=self.rng.uniform(0, span))
            aggregate = f"order_{order_id}"
            metadata = json.dumps({"source": "bench", "correlation_id": f"c{order_id}"})
            for version, (event_type, data, moment) in enumerate(self.life(order_id, start), start=1):
                rows.append((moment, order_id, version, aggregate, event_type, json.dumps(data), metadata))
        rows.sort(key=lambda r: (r[0], r[1], r[2]))
        return [(r[3], "order", r[4], r[5], r[6], r[2], r[0]) for r in rows], order_id

    def trickle(self, first_order_id: int, active: int = 20) -> Iterator[tuple[str, int, str, str]]:
        """Endless (aggregate_id, version, event_type, data JSON): `active` lives advancing at random."""
        lives: list[Life] = []
        next_id = first_order_id
        while True:
            while len(lives) < active:
                life = Life(next_id, [(t, d) for t, d, _ in self.life(next_id, datetime.now(UTC))])
                lives.append(life)
                next_id += 1
            life = self.rng.choice(lives)
            event_type, data = life.events.pop(0)
            yield f"order_{life.order_id}", life.next_version, event_type, json.dumps(data)
            life.next_version += 1
            if not life.events:
                lives.remove(life)


COPY_COLUMNS = ["aggregate_id", "aggregate_type", "event_type", "data", "metadata", "version", "created_at"]
