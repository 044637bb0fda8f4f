"""Helpers for tests/test_daemon_resilience.py.

- `DaemonProcess`: a real `python -m pgprojector run` subprocess, its JSON log lines, signals.
- Order lives: planned ones for a bulk insert, and live ones for producers using the append API.
- `fold`: an INDEPENDENT fold of the whole events log into the expected read models, written from
  CONTRACT.md's rules in plain Python (it deliberately does not import pgprojector.projections).
- `witness`: a test projection that records every event it is handed, one row each; applying an
  event twice violates its primary key.

Subprocesses import this module (PGPROJECTOR_PROJECTIONS=...,daemon_harness:witness), so keep
its imports light.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import asyncpg

import pgprojector
from pgprojector import EventStore, NewEvent

TESTS_DIR = Path(__file__).resolve().parent
BUILTINS = ("orders", "dashboard", "analytics")
WITH_WITNESS = "orders,dashboard,analytics,daemon_harness:witness"
ALL_WITH_WITNESS = (*BUILTINS, "witness")


# --------------------------------------------------------------------------------------------
# The witness projection
# --------------------------------------------------------------------------------------------

WITNESS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS witness (position BIGINT PRIMARY KEY, aggregate_id TEXT NOT NULL, "
    "version BIGINT NOT NULL, applied_seq BIGSERIAL)"
)


async def _witness_handle(conn: asyncpg.Connection, events: Sequence[pgprojector.RecordedEvent]) -> None:
    await conn.execute(
        "INSERT INTO witness (position, aggregate_id, version) "
        "SELECT p, a, v FROM unnest($1::bigint[], $2::text[], $3::bigint[]) WITH ORDINALITY AS u(p, a, v, n) "
        "ORDER BY n",
        [e.position for e in events], [e.aggregate_id for e in events], [e.version for e in events],
    )


witness = pgprojector.Projection(name="witness", handle=_witness_handle, schema=WITNESS_SCHEMA, tables=("witness",))


# Witnesses whose handler works PGPROJECTOR_TEST_SLOW_MS (50) per event in Python, idle in its
# transaction meanwhile, as a handler calling out to another service would: `slow_witness` before it
# writes, `slow_after_witness` after (its session is then ended at the worker's next statement).
def _slow_witness(name: str, *, work_first: bool) -> pgprojector.Projection:
    async def handle(conn: asyncpg.Connection, events: Sequence[pgprojector.RecordedEvent]) -> None:
        work = float(os.environ.get("PGPROJECTOR_TEST_SLOW_MS", "50")) / 1000 * len(events)
        if work_first:
            await asyncio.sleep(work)
        await conn.executemany(f"INSERT INTO {name} (position, aggregate_id, version) VALUES ($1, $2, $3)",
                               [(e.position, e.aggregate_id, e.version) for e in events])
        if not work_first:
            await asyncio.sleep(work)

    return pgprojector.Projection(name=name, handle=handle, schema=WITNESS_SCHEMA.replace("witness", name),
                                  tables=(name,))


slow_witness = _slow_witness("slow_witness", work_first=True)
slow_after_witness = _slow_witness("slow_after_witness", work_first=False)


# --------------------------------------------------------------------------------------------
# Daemon subprocesses
# --------------------------------------------------------------------------------------------

# Every daemon connection of this database (the producers' and the caller's spared), cut.
CUT_DAEMON_CONNECTIONS = """
SELECT pid, application_name, state, pg_terminate_backend(pid) AS terminated
FROM pg_stat_activity
WHERE datname = current_database()
  AND application_name LIKE 'pgprojector-%'
  AND application_name <> 'pgprojector-producer'
  AND pid <> pg_backend_pid()
"""


def daemon_env(dsn: str, **settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PGPROJECTOR_")}
    env["PGPROJECTOR_DSN"] = dsn
    env["PGPROJECTOR_LOG_FORMAT"] = "json"
    env.update({f"PGPROJECTOR_{key.upper()}": str(value) for key, value in settings.items()})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(*args: str, dsn: str, timeout: float = 60, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgprojector", *args], env=daemon_env(dsn, **settings),
                          capture_output=True, text=True, timeout=timeout, check=False)


def _last_error_line(traceback: str) -> str:
    lines = [line.strip(" |") for line in traceback.splitlines() if re.search(r"(Error|Exception|Interrupt)\b.*:", line)]
    return lines[-1] if lines else traceback.strip().splitlines()[-1]


class DaemonProcess:
    """`python -m pgprojector run` with its stderr (JSON log lines) in a file."""

    def __init__(self, dsn: str, log_path: Path, **settings: str) -> None:
        self.log_path = log_path
        self._log_file = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgprojector", "run"], env=daemon_env(dsn, **settings),
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=self._log_file,
        )
        self.pid = self.proc.pid
        self.started_at = time.monotonic()

    # -- state ---------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 40) -> str:
        """The last log lines, and the last line of any logged traceback (JSON lines hide it)."""
        text = "\n".join(self.text().splitlines()[-lines:])
        errors = [_last_error_line(r["exception"]) for r in self.logs() if isinstance(r.get("exception"), str)]
        return text + (f"\n[exceptions logged: {errors}]" if errors else "")

    def logs(self) -> list[dict[str, Any]]:
        """Every complete JSON line; a line that is not JSON becomes {"event": "<non-json>", "raw": ...}."""
        out = []
        for line in self.text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = {"event": "<non-json>", "raw": line}
            if not isinstance(record, dict):
                record = {"event": "<non-json>", "raw": line}
            out.append(record)
        return out

    def log_events(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.logs() if r.get("event") == event
                and all(r.get(key) == value for key, value in match.items())]

    # -- control -------------------------------------------------------------------------------
    def send(self, signum: int) -> None:
        os.kill(self.pid, signum)

    async def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon pid {self.pid} did not exit within {timeout}s; log tail:\n{self.tail()}")
            await asyncio.sleep(0.02)
        return self.proc.returncode

    async def kill9(self) -> None:
        if self.proc.poll() is None:
            self.send(signal.SIGKILL)
        await self.wait_exit(10)

    async def wait_for_log(self, event: str, timeout: float, count: int = 1, **match: Any) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.log_events(event, **match)
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode} before logging {event!r}:\n"
                                     f"{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {event!r} log line within {timeout}s:\n{self.tail()}")
            await asyncio.sleep(0.05)

    def close(self) -> None:
        """Kill if still running; always reap. Safe to call twice."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        finally:
            if not self._log_file.closed:
                self._log_file.close()


# --------------------------------------------------------------------------------------------
# Order lives
# --------------------------------------------------------------------------------------------

RESTAURANTS = 25
ORDER_TYPES = ("OrderCreated", "OrderConfirmed", "DriverAssigned", "OrderPickedUp", "OrderDelivered", "OrderCancelled")
TERMINAL = {"OrderDelivered", "OrderCancelled"}


def event_data(event_type: str, order_id: int, rng: random.Random, at: datetime | None = None) -> dict[str, Any]:
    """A valid payload of `event_type` for order `order_id` (CONTRACT.md's fields)."""
    data: dict[str, Any] = {"order_id": order_id}
    if event_type == "OrderCreated":
        user_id = rng.randint(1, 5000)
        items = [{"sku": f"sku-{rng.randint(1, 300)}", "qty": rng.randint(1, 4)} for _ in range(rng.randint(1, 3))]
        cents = rng.randint(500, 25000)
        # A decimal as a string, or as a JSON number: the contract allows both.
        amount: Any = f"{cents // 100}.{cents % 100:02d}" if rng.random() < 0.7 else cents / 100
        data.update(user_id=user_id, user_name=f"user {user_id}", items=items, total_amount=amount,
                    delivery_address=f"{rng.randint(1, 999)} Main Street, flat {rng.randint(1, 40)}")
    elif event_type == "OrderConfirmed":
        restaurant_id = rng.randint(1, RESTAURANTS)
        base = at or datetime.now(UTC)
        offset = timedelta(hours=rng.choice((0, 2, -5, 5.5)))
        eta = (base + timedelta(minutes=rng.randint(20, 90))).astimezone(timezone(offset))
        eta = eta.replace(microsecond=rng.randint(0, 999) * 1000)
        data.update(restaurant_id=restaurant_id, restaurant_name=f"Restaurant {restaurant_id}",
                    estimated_delivery=eta.isoformat())
    elif event_type == "DriverAssigned":
        driver_id = rng.randint(1, 400)
        data.update(driver_id=driver_id, driver_name=f"driver {driver_id}")
    elif event_type == "OrderCancelled":
        data.update(reason=rng.choice(("customer changed mind", "restaurant closed", "no driver", "payment failed")))
    return data


def next_step(last_type: str | None, rng: random.Random) -> str | None:
    """The order state machine: the event after `last_type` (None: the order is over)."""
    if last_type is None:
        return "OrderCreated"
    if last_type == "OrderCreated":
        return "OrderConfirmed" if rng.random() < 0.85 else "OrderCancelled"
    if last_type == "OrderConfirmed":
        return "DriverAssigned" if rng.random() < 0.88 else "OrderCancelled"
    if last_type == "DriverAssigned":
        return "OrderPickedUp" if rng.random() < 0.92 else "OrderCancelled"
    if last_type == "OrderPickedUp":
        return "OrderDelivered"
    return None


@dataclass
class Planned:
    aggregate_id: str
    event_type: str
    data: dict[str, Any]
    version: int
    created_at: datetime


BASE_TIME = datetime(2024, 3, 1, tzinfo=UTC)


def plan_orders(count: int, rng: random.Random, first_id: int = 1, days: float = 3.0,
                stop_early: float = 0.04) -> list[Planned]:
    """`count` order lives spread over `days` days, interleaved in time order (so in log order).

    Some orders stop early (still in flight), some are cancelled before or after confirmation,
    most are delivered; steps are minutes apart, so many lives cross a UTC midnight.
    """
    planned: list[Planned] = []
    for order_id in range(first_id, first_id + count):
        at = BASE_TIME + timedelta(seconds=rng.uniform(0, days * 86400))
        last: str | None = None
        version = 0
        while True:
            step = next_step(last, rng)
            if step is None or (last is not None and rng.random() < stop_early):
                break
            version += 1
            planned.append(Planned(f"order_{order_id}", step, event_data(step, order_id, rng, at), version,
                                   at.replace(microsecond=rng.randint(0, 999999))))
            last = step
            at += timedelta(minutes=rng.uniform(1, 90))
    planned.sort(key=lambda p: (p.created_at, p.aggregate_id, p.version))
    return planned


async def insert_planned(conn: asyncpg.Connection, planned: Sequence[Planned], chunk: int = 10000) -> None:
    """Plain multi-row INSERT ... SELECT, in log order, as any producer could write them."""
    for start in range(0, len(planned), chunk):
        part = planned[start:start + chunk]
        await conn.execute(
            "INSERT INTO events (aggregate_id, aggregate_type, event_type, data, version, created_at) "
            "SELECT a, 'order', t, d::jsonb, v, c "
            "FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::timestamptz[]) "
            "     WITH ORDINALITY AS u(a, t, d, v, c, n) ORDER BY n",
            [p.aggregate_id for p in part], [p.event_type for p in part],
            [json.dumps(p.data) for p in part], [p.version for p in part], [p.created_at for p in part],
        )


@dataclass
class ProducerStats:
    appends: int = 0
    conflicts_retried: int = 0
    orders: int = 0
    errors: list[str] = field(default_factory=list)


async def run_producers(pool: asyncpg.Pool, seconds: float, rng: random.Random, *, tasks: int = 6,
                        first_id: int = 1_000_000, pause: float = 0.004) -> ProducerStats:
    """Drive orders through their lives with EventStore.append_with_retry for `seconds`.

    Several tasks share the set of open orders, so they race on the same aggregates (conflicts,
    re-decisions); sometimes one append carries two events (one multi-row statement).
    """
    store = EventStore(pool)
    stats = ProducerStats()
    open_orders: list[int] = []
    next_id = [first_id]
    deadline = time.monotonic() + seconds

    def decide_for(order_id: int, task_rng: random.Random):
        calls = [0]

        def decide(history: list[pgprojector.RecordedEvent]) -> list[NewEvent]:
            calls[0] += 1
            last = history[-1].event_type if history else None
            out: list[NewEvent] = []
            for _ in range(2 if task_rng.random() < 0.2 else 1):
                step = next_step(last, task_rng)
                if step is None:
                    break
                out.append(NewEvent(step, event_data(step, order_id, task_rng)))
                last = step
            return out

        return decide, calls

    async def producer(index: int) -> None:
        task_rng = random.Random(rng.random())
        while time.monotonic() < deadline:
            if not open_orders or task_rng.random() < 0.25:
                order_id = next_id[0]
                next_id[0] += 1
                stats.orders += 1
            else:
                order_id = task_rng.choice(open_orders)
            decide, calls = decide_for(order_id, task_rng)
            try:
                version = await store.append_with_retry(f"order_{order_id}", "order", decide, max_attempts=50)
            except Exception as exc:  # a producer must never fail here: the daemon is the one disturbed
                stats.errors.append(f"{type(exc).__name__}: {exc}")
                raise
            stats.appends += 1
            stats.conflicts_retried += calls[0] - 1
            history = await store.read_stream(f"order_{order_id}")
            assert len(history) >= version  # other tasks may have appended since
            if history and history[-1].event_type in TERMINAL:
                if order_id in open_orders:
                    open_orders.remove(order_id)
            elif order_id not in open_orders:
                open_orders.append(order_id)
            await asyncio.sleep(task_rng.uniform(0, pause))

    async with asyncio.TaskGroup() as group:  # one failing producer cancels the others
        for index in range(tasks):
            group.create_task(producer(index))
    return stats


# --------------------------------------------------------------------------------------------
# The independent fold (CONTRACT.md "Events of the order aggregate", "Errors while projecting")
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LogEvent:
    position: int
    aggregate_id: str
    aggregate_type: str
    event_type: str
    data: Any
    version: int
    created_at: datetime


async def read_log(conn: asyncpg.Connection) -> list[LogEvent]:
    rows = await conn.fetch(
        "SELECT position, aggregate_id, aggregate_type, event_type, data::text AS data, version, created_at "
        "FROM events ORDER BY position"
    )
    return [LogEvent(r["position"], r["aggregate_id"], r["aggregate_type"], r["event_type"], json.loads(r["data"]),
                     r["version"], r["created_at"]) for r in rows]


# Which event types each built-in projection knows; others are passed over (CONTRACT.md).
# The orders read model and the dashboard change on every order event; the restaurant-daily
# analytics only needs OrderCreated (the amount) and the three counting events.
KNOWN_TYPES = {
    "orders": frozenset(ORDER_TYPES),
    "dashboard": frozenset(ORDER_TYPES),
    "analytics": frozenset({"OrderCreated", "OrderConfirmed", "OrderDelivered", "OrderCancelled"}),
}
STATUS_AFTER = {
    "OrderCreated": "created", "OrderConfirmed": "confirmed", "DriverAssigned": "driver_assigned",
    "OrderPickedUp": "picked_up", "OrderDelivered": "delivered", "OrderCancelled": "cancelled",
}


def _is_id(value: Any) -> bool:
    """An id: a non-negative integer below 10**18, as a JSON number or a string of digits."""
    if isinstance(value, str):
        return re.fullmatch(r"[0-9]{1,18}", value) is not None
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**18


def _money(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    try:
        amount = Decimal(value if isinstance(value, str) else str(value))
    except InvalidOperation:
        return None
    if not amount.is_finite() or amount < 0 or amount != amount.quantize(Decimal("0.01")):
        return None
    return amount


def _aware(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


# The data fields each built-in projection reads, and so checks; every projection takes the order
# from aggregate_id, which must be order_<number> (digits with no leading zero).
READS = {
    "orders": frozenset({"order_id", "user_id", "user_name", "items", "total_amount", "delivery_address", "restaurant_id",
                         "restaurant_name", "estimated_delivery", "driver_id", "driver_name", "reason"}),
    "dashboard": frozenset({"total_amount"}),
    "analytics": frozenset({"total_amount", "restaurant_id"}),
}


def order_number(event: LogEvent) -> int | None:
    """The order an event belongs to: the number of its aggregate_id order_<number>, or None."""
    match = re.fullmatch(r"order_(0|[1-9][0-9]{0,17})", event.aggregate_id)
    return int(match.group(1)) if match else None


def invalid_reason(event: LogEvent, reads: frozenset[str] = READS["orders"]) -> str | None:
    """Why `event` does not validate for a projection reading CONTRACT.md's fields in `reads`, or None."""
    data = event.data
    if "order_id" in reads:
        if not isinstance(data, dict):
            return "data is not an object"
        if not _is_id(data.get("order_id")):
            return "order_id"
        if event.aggregate_id != f"order_{data['order_id']}":
            return "order_id does not match the aggregate"
    if order_number(event) is None:
        return "aggregate_id"
    if not isinstance(data, dict):
        data = {}
    required: dict[str, Any] = {
        "OrderCreated": {"user_id": _is_id, "user_name": lambda v: isinstance(v, str),
                         "items": lambda v: isinstance(v, list), "total_amount": lambda v: _money(v) is not None,
                         "delivery_address": lambda v: isinstance(v, str)},
        "OrderConfirmed": {"restaurant_id": _is_id, "restaurant_name": lambda v: isinstance(v, str),
                           "estimated_delivery": lambda v: _aware(v) is not None},
        "DriverAssigned": {"driver_id": _is_id, "driver_name": lambda v: isinstance(v, str)},
        "OrderCancelled": {"reason": lambda v: isinstance(v, str)},
    }.get(event.event_type, {})
    for name, check in required.items():
        if name in reads and (name not in data or not check(data[name])):
            return name
    return None


def utc_day(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


@dataclass
class Expected:
    orders: dict[int, dict[str, Any]]
    dashboard: dict[str, tuple[int, Decimal]]
    daily: dict[tuple[int, date], tuple[int, int, int, Decimal]]
    halted_at: dict[str, int | None]  # position of the event each projection halted at
    parked: dict[str, list[int]]  # positions each projection parked
    last_position: dict[str, int]  # the position each projection has applied up to (halt: just before it)


def fold(log: Iterable[LogEvent], on_error: str = "strict") -> Expected:
    """The read models CONTRACT.md prescribes for `log`.

    on_error: 'strict' (every event must apply: asserts), 'halt' (a projection stops at its first
    failing event), 'park' (a failing event is skipped and listed as parked).
    """
    assert on_error in ("strict", "halt", "park")
    orders: dict[int, dict[str, Any]] = {}
    dash: dict[int, list[Any]] = {}  # order_id -> [status, amount, version]
    ana: dict[int, list[Any]] = {}  # order_id -> [amount, restaurant_id or None, version]
    daily: dict[tuple[int, date], list[Any]] = {}
    halted_at: dict[str, int | None] = dict.fromkeys(BUILTINS)
    parked: dict[str, list[int]] = {name: [] for name in BUILTINS}
    last_position: dict[str, int] = dict.fromkeys(BUILTINS, 0)
    memory = {"orders": orders, "dashboard": dash, "analytics": ana}

    def current_version(name: str, order_id: int) -> int | None:
        known = memory[name].get(order_id)
        if known is None:
            return None
        return known["current_version"] if name == "orders" else known[2]

    for event in log:
        for name in BUILTINS:
            if halted_at[name] is not None:
                continue
            if event.aggregate_type != "order" or event.event_type not in KNOWN_TYPES[name]:
                last_position[name] = event.position
                continue
            reason = invalid_reason(event, READS[name])
            order_id = order_number(event)
            if reason is None:
                version = current_version(name, order_id)
                if version is not None and event.version <= version:
                    last_position[name] = event.position  # applied already: changes nothing
                    continue
                if event.event_type == "OrderCreated" and version is not None:
                    reason = "OrderCreated of an existing order"
                elif event.event_type != "OrderCreated" and version is None:
                    reason = "no OrderCreated applied"
            if reason is not None:
                if on_error == "strict":
                    raise AssertionError(f"harness: event at position {event.position} is invalid for {name}: {reason}")
                if on_error == "halt":
                    halted_at[name] = event.position
                else:
                    parked[name].append(event.position)
                    last_position[name] = event.position
                continue
            _apply(name, event, memory, daily)
            last_position[name] = event.position

    dashboard: dict[str, list[Any]] = {}
    for status, amount, _version in dash.values():
        entry = dashboard.setdefault(status, [0, Decimal(0)])
        entry[0] += 1
        entry[1] += amount
    return Expected(
        orders=orders,
        dashboard={status: (count, total) for status, (count, total) in dashboard.items()},
        daily={key: tuple(value) for key, value in daily.items()},  # type: ignore[misc]
        halted_at=halted_at, parked=parked, last_position=last_position,
    )


def _apply(name: str, event: LogEvent, memory: dict[str, dict[int, Any]], daily: dict[tuple[int, date], list[Any]]) -> None:
    data = event.data
    order_id = order_number(event)
    kind = event.event_type
    if name == "orders":
        rows = memory["orders"]
        if kind == "OrderCreated":
            rows[order_id] = {
                "order_id": order_id, "user_id": int(data["user_id"]), "restaurant_id": None, "status": None,
                "items": data["items"], "total_amount": _money(data["total_amount"]),
                "delivery_address": data["delivery_address"], "created_at": event.created_at,
                "user_name": data["user_name"], "restaurant_name": None, "driver_name": None,
                "estimated_delivery": None,
            }
        row = rows[order_id]
        if kind == "OrderConfirmed":
            row.update(restaurant_id=int(data["restaurant_id"]), restaurant_name=data["restaurant_name"],
                       estimated_delivery=_aware(data["estimated_delivery"]))
        elif kind == "DriverAssigned":
            row["driver_name"] = data["driver_name"]
        row.update(status=STATUS_AFTER[kind], updated_at=event.created_at, current_version=event.version)
    elif name == "dashboard":
        orders = memory["dashboard"]
        if kind == "OrderCreated":
            orders[order_id] = [STATUS_AFTER[kind], _money(data["total_amount"]), event.version]
        else:
            orders[order_id][0] = STATUS_AFTER[kind]
            orders[order_id][2] = event.version
    else:
        orders = memory["analytics"]
        if kind == "OrderCreated":
            orders[order_id] = [_money(data["total_amount"]), None, event.version]
            return
        order = orders[order_id]
        order[2] = event.version
        if kind == "OrderConfirmed":
            order[1] = int(data["restaurant_id"])
            daily.setdefault((order[1], utc_day(event.created_at)), [0, 0, 0, Decimal(0)])[0] += 1
        elif order[1] is None:
            return  # cancelled (or delivered) before any confirmation: counts nowhere
        elif kind == "OrderDelivered":
            day = daily.setdefault((order[1], utc_day(event.created_at)), [0, 0, 0, Decimal(0)])
            day[1] += 1
            day[3] += order[0]
        elif kind == "OrderCancelled":
            daily.setdefault((order[1], utc_day(event.created_at)), [0, 0, 0, Decimal(0)])[2] += 1


# --------------------------------------------------------------------------------------------
# Reading the read models back, and comparing
# --------------------------------------------------------------------------------------------

ORDER_COLUMNS = ("order_id", "user_id", "restaurant_id", "status", "items", "total_amount", "delivery_address",
                 "created_at", "updated_at", "current_version", "user_name", "restaurant_name", "driver_name",
                 "estimated_delivery")


@dataclass
class Actual:
    orders: dict[int, dict[str, Any]]
    dashboard: dict[str, tuple[int, Decimal]]
    daily: dict[tuple[int, date], tuple[int, int, int, Decimal]]


async def read_models(conn: asyncpg.Connection) -> Actual:
    orders = {}
    for row in await conn.fetch(
        f"SELECT {', '.join(c if c != 'items' else 'items::text AS items' for c in ORDER_COLUMNS)} FROM read_model_orders"
    ):
        record = dict(row)
        record["items"] = json.loads(record["items"])
        orders[record["order_id"]] = record
    dashboard = {r["status"]: (r["order_count"], r["total_amount"])
                 for r in await conn.fetch("SELECT status, order_count, total_amount FROM read_model_dashboard")
                 if not (r["order_count"] == 0 and r["total_amount"] == 0)}  # an empty status may stay or go
    daily = {(r["restaurant_id"], r["day"]): (r["confirmed"], r["delivered"], r["cancelled"], r["revenue"])
             for r in await conn.fetch("SELECT * FROM read_model_restaurant_daily")}
    return Actual(orders, dashboard, daily)


def _diff(label: str, actual: dict[Any, Any], expected: dict[Any, Any], limit: int = 8) -> list[str]:
    problems = []
    missing = [k for k in expected if k not in actual]
    extra = [k for k in actual if k not in expected]
    wrong = [k for k in expected if k in actual and actual[k] != expected[k]]
    if missing:
        problems.append(f"{label}: {len(missing)} missing, e.g. {sorted(missing, key=str)[:limit]}")
    if extra:
        problems.append(f"{label}: {len(extra)} unexpected, e.g. {sorted(extra, key=str)[:limit]}")
    for key in sorted(wrong, key=str)[:limit]:
        a, e = actual[key], expected[key]
        if isinstance(a, dict) and isinstance(e, dict):
            detail = {c: (a.get(c), e.get(c)) for c in e if a.get(c) != e.get(c)}
            problems.append(f"{label}[{key}] (actual, expected): {detail}")
        else:
            problems.append(f"{label}[{key}]: actual {a}, expected {e}")
    if len(wrong) > limit:
        problems.append(f"{label}: {len(wrong)} wrong in all")
    return problems


def compare(actual: Actual, expected: Expected, which: Iterable[str] = BUILTINS) -> list[str]:
    """Differences between the read models and the fold ([] when they agree)."""
    problems: list[str] = []
    which = set(which)
    if "orders" in which:
        problems += _diff("read_model_orders", actual.orders, expected.orders)
    if "dashboard" in which:
        problems += _diff("read_model_dashboard", actual.dashboard, expected.dashboard)
    if "analytics" in which:
        problems += _diff("read_model_restaurant_daily", actual.daily, expected.daily)
    return problems


# --------------------------------------------------------------------------------------------
# Waiting for catch-up
# --------------------------------------------------------------------------------------------

async def checkpoints(conn: asyncpg.Connection) -> dict[str, dict[str, Any]]:
    return {r["name"]: dict(r) for r in await conn.fetch(
        "SELECT name, position, state, last_error FROM pgprojector_projections")}


async def explain_error(conn: asyncpg.Connection, points: dict[str, dict[str, Any]], names: Iterable[str]) -> str:
    """For a failure message: the log of each aggregate named in the projections' last errors."""
    lines = []
    has_witness = await conn.fetchval("SELECT to_regclass('witness') IS NOT NULL")
    for name in names:
        for aggregate_id in sorted(set(re.findall(r"order_\d+", points[name]["last_error"] or ""))):
            lines.append(f"{name} (checkpoint {points[name]['position']}): the log of {aggregate_id}:")
            for row in await conn.fetch(
                "SELECT position, version, event_type, created_at, "
                + ("EXISTS (SELECT 1 FROM witness w WHERE w.position = e.position) " if has_witness else "NULL ")
                + "AS witnessed FROM events e WHERE aggregate_id = $1 ORDER BY version", aggregate_id
            ):
                lines.append(f"    {dict(row)}")
    return "\n".join(lines)


async def head(conn: asyncpg.Connection) -> int:
    return await conn.fetchval("SELECT coalesce(max(position), 0) FROM events")


async def wait_caught_up(conn: asyncpg.Connection, names: Iterable[str], timeout: float,
                         daemons: Sequence[DaemonProcess] = (), target: int | None = None) -> int:
    """Until every projection in `names` has its checkpoint at the head of the log (and the read
    horizon is there too); returns the head. Fails early if a daemon exits."""
    names = list(names)
    deadline = time.monotonic() + timeout
    while True:
        top = await head(conn)
        horizon = await conn.fetchval("SELECT horizon FROM pgprojector_horizon()")
        points = await checkpoints(conn)
        goal = top if target is None else target
        if horizon >= goal and all(name in points and points[name]["position"] >= goal for name in names):
            return top
        halted = [name for name in names if name in points and points[name]["state"] == "halted"]
        if halted:
            raise AssertionError(f"projection(s) {halted} halted while catching up (head {top}): "
                                 f"{[points[name] for name in halted]}\n{await explain_error(conn, points, halted)}")
        for daemon in daemons:
            if not daemon.alive:
                raise AssertionError(f"daemon pid {daemon.pid} exited with {daemon.returncode} before catching up "
                                     f"(head {top}, checkpoints {points}):\n{daemon.tail()}")
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- daemon {d.pid}:\n{d.tail(15)}" for d in daemons)
            raise AssertionError(f"not caught up within {timeout}s: head {top}, horizon {horizon}, "
                                 f"checkpoints {points}\n{tails}")
        await asyncio.sleep(0.1)
