"""pgprojector: an event store and projection daemon for PostgreSQL."""

from pgprojector.errors import (
    ConcurrencyError,
    ConfigError,
    InvalidEventError,
    PgProjectorError,
    ProjectionError,
    RetriesExhaustedError,
)
from pgprojector.events import NewEvent, RecordedEvent
from pgprojector.projection import Projection
from pgprojector.store import EventStore

__all__ = [
    "ConcurrencyError",
    "ConfigError",
    "EventStore",
    "InvalidEventError",
    "NewEvent",
    "PgProjectorError",
    "Projection",
    "ProjectionError",
    "RecordedEvent",
    "RetriesExhaustedError",
]
