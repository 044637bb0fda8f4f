"""The order aggregate's events (CONTRACT.md), validated before any projection trusts them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from pgprojector.errors import ProjectionError
from pgprojector.events import RecordedEvent

Money = Annotated[Decimal, Field(ge=0, max_digits=10, decimal_places=2, allow_inf_nan=False)]
Id = Annotated[int, Field(ge=0, le=2**63 - 1)]


class _OrderEvent(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    order_id: Id


class OrderCreated(_OrderEvent):
    user_id: Id
    user_name: str = Field(max_length=100)
    items: list[Any]
    total_amount: Money
    delivery_address: str


class OrderConfirmed(_OrderEvent):
    restaurant_id: Id
    restaurant_name: str = Field(max_length=100)
    estimated_delivery: AwareDatetime


class DriverAssigned(_OrderEvent):
    driver_id: Id
    driver_name: str = Field(max_length=100)


class OrderPickedUp(_OrderEvent):
    pass


class OrderDelivered(_OrderEvent):
    pass


class OrderCancelled(_OrderEvent):
    reason: str


MODELS: dict[str, type[_OrderEvent]] = {
    model.__name__: model
    for model in (OrderCreated, OrderConfirmed, DriverAssigned, OrderPickedUp, OrderDelivered, OrderCancelled)
}
STATUS_AFTER = {
    "OrderCreated": "created",
    "OrderConfirmed": "confirmed",
    "DriverAssigned": "driver_assigned",
    "OrderPickedUp": "picked_up",
    "OrderDelivered": "delivered",
    "OrderCancelled": "cancelled",
}


def parse(event: RecordedEvent) -> _OrderEvent | None:
    """The validated payload of an order event; None for events of other kinds (passed over)."""
    model = MODELS.get(event.event_type)
    if model is None or event.aggregate_type != "order":
        return None
    try:
        payload = model.model_validate(event.data)
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'data'}: {e['msg']}" for e in exc.errors())
        raise ProjectionError(
            f"{event.event_type} at position {event.position} ({event.aggregate_id} v{event.version}): "
            f"invalid data: {details}",
            position=event.position, event_type=event.event_type,
        ) from None
    if event.aggregate_id != f"order_{payload.order_id}":
        raise ProjectionError(
            f"{event.event_type} at position {event.position}: aggregate {event.aggregate_id} "
            f"carries order_id {payload.order_id}",
            position=event.position, event_type=event.event_type,
        )
    return payload


def parse_batch(events: Sequence[RecordedEvent]) -> list[tuple[RecordedEvent, _OrderEvent]]:
    parsed = []
    for event in events:
        payload = parse(event)
        if payload is not None:
            parsed.append((event, payload))
    return parsed


def not_created(event: RecordedEvent) -> ProjectionError:
    return ProjectionError(
        f"{event.event_type} at position {event.position}: {event.aggregate_id} has no OrderCreated applied",
        position=event.position, event_type=event.event_type,
    )


def utc_day(moment: datetime) -> date:
    return moment.astimezone(UTC).date()
