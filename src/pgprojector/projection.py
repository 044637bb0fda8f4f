"""The public projection API: what a read model is, and how `pgprojector run` finds one."""

from __future__ import annotations

import importlib
import re
import traceback
from collections.abc import Awaitable, Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import asyncpg

from pgprojector.errors import ConfigError
from pgprojector.events import RecordedEvent

Handler = Callable[[asyncpg.Connection, Sequence[RecordedEvent]], Awaitable[None]]
RangeHandler = Callable[[asyncpg.Connection, int, int], Awaitable[int | None]]

ENTRY_POINT_GROUP = "pgprojector.projections"
BUILTINS = {
    "orders": "pgprojector.projections.orders:projection",
    "dashboard": "pgprojector.projections.dashboard:projection",
    "analytics": "pgprojector.projections.analytics:projection",
}
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class Projection:
    """A read model kept up to date from the log.

    - `name`: its identity; its checkpoint is stored under it (lowercase identifier).
    - `handle(conn, events)`: applies a batch, in log order, inside the batch's transaction; the
      checkpoint is written in the same transaction, so the handler sees each event once
      (a replay after a crash re-applies nothing already committed). Raise to reject the batch.
    - or `handle_range(conn, after, upto)`, for handlers written in SQL: the batch is the events in
      positions (after, upto] of the wanted types, read by the handler's own set-based SQL straight
      from `events` (no event travels to Python); it returns how many it applied, or None (they are
      then counted for the logs). Same transaction, same guarantees: the range never reaches past
      the read horizon and holds at most `batch_size` events (it spans `batch_size` positions, or
      reaches the next wanted event when the batch size is one). Give exactly one of `handle` and
      `handle_range`.
    - `event_types`: the event types it wants, any set of names (kept as a frozenset; None: all);
      the others are passed over.
    - `schema`: idempotent DDL (CREATE TABLE IF NOT EXISTS ...) for its own tables, run by `migrate`.
    - `tables`: the tables `rebuild` empties before replaying the log.
    """

    name: str
    handle: Handler | None = None
    event_types: AbstractSet[str] | None = None
    schema: str = ""
    tables: tuple[str, ...] = field(default=())
    handle_range: RangeHandler | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(f"projection name {self.name!r} must be a lowercase identifier")
        if (self.handle is None) == (self.handle_range is None):
            raise ConfigError(f"projection {self.name}: give exactly one of handle and handle_range")
        if isinstance(self.event_types, str):  # a set of its letters, silently, without this check
            raise ConfigError(f"projection {self.name}: event_types is a set of names, not one name")
        if self.event_types is not None:
            object.__setattr__(self, "event_types", frozenset(self.event_types))

    async def apply_one(self, conn: asyncpg.Connection, event: RecordedEvent) -> None:
        """Apply a single event with whichever handler this projection has (a dead letter's retry)."""
        if self.handle_range is not None:
            await self.handle_range(conn, event.position - 1, event.position)
        else:
            assert self.handle is not None
            await self.handle(conn, [event])


def load_projection(ref: str) -> Projection:
    """A built-in name, an entry point in group `pgprojector.projections`, or `module:attribute`."""
    target = BUILTINS.get(ref)
    if target is None and ":" not in ref:
        matches = entry_points(group=ENTRY_POINT_GROUP, name=ref)
        if not matches:
            raise ConfigError(
                f"PGPROJECTOR_PROJECTIONS: unknown projection {ref!r} "
                f"(built-ins: {', '.join(BUILTINS)}; or give module:attribute)"
            )
        target = next(iter(matches)).value
    module_name, _, attribute = (target or ref).partition(":")
    try:
        found: object = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"PGPROJECTOR_PROJECTIONS: cannot load {ref!r}: {exc}") from None
    except Exception as exc:
        # The user's module fails as it is imported: one line saying where, not a traceback and exit 1.
        # (A SyntaxError names its file and line itself; otherwise the innermost frame does.)
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = "" if isinstance(exc, SyntaxError) else f" ({frame.filename}, line {frame.lineno})"
        raise ConfigError(f"PGPROJECTOR_PROJECTIONS: cannot load {ref!r}: importing {module_name} raised "
                          f"{type(exc).__name__}: {exc}{where}") from None
    if not isinstance(found, Projection):
        raise ConfigError(f"PGPROJECTOR_PROJECTIONS: {ref!r} is a {type(found).__name__}, not a pgprojector.Projection")
    return found


def load_projections(refs: Iterable[str]) -> list[Projection]:
    loaded = [load_projection(ref) for ref in refs]
    names = [projection.name for projection in loaded]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"PGPROJECTOR_PROJECTIONS: projection name(s) given twice: {', '.join(duplicates)}")
    return loaded
