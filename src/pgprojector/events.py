"""The two shapes of an event: one to append, one read back from the log."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pgprojector.errors import InvalidEventError

MAX_AGGREGATE_ID = 100
MAX_AGGREGATE_TYPE = 50
MAX_EVENT_TYPE = 100


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append. `data` must serialise to a JSON object."""

    event_type: str
    data: Mapping[str, Any]
    metadata: Mapping[str, Any] | None = None

    def encode(self) -> tuple[str, str, str | None]:
        """(event_type, data JSON, metadata JSON), or InvalidEventError."""
        if not isinstance(self.event_type, str) or not self.event_type.strip():
            raise InvalidEventError("event_type must be a non-empty string")
        if len(self.event_type) > MAX_EVENT_TYPE:
            raise InvalidEventError(f"event_type is longer than {MAX_EVENT_TYPE} characters: {self.event_type[:40]!r}...")
        if not isinstance(self.data, Mapping):
            raise InvalidEventError(f"{self.event_type}: data must be a JSON object (a mapping), not {type(self.data).__name__}")
        if self.metadata is not None and not isinstance(self.metadata, Mapping):
            raise InvalidEventError(f"{self.event_type}: metadata must be a mapping or None")
        _check_text("event_type", self.event_type)
        try:
            data = _json_text(self.data)
            metadata = None if self.metadata is None else _json_text(self.metadata)
        except (TypeError, ValueError, RecursionError) as exc:  # (nested deeper than json goes)
            raise InvalidEventError(f"{self.event_type}: data is not JSON-serialisable: {exc}") from None
        if _holds_nul(data) or (metadata is not None and _holds_nul(metadata)):
            raise InvalidEventError(f"{self.event_type}: data contains a NUL character, which jsonb cannot store")
        return self.event_type, data, metadata


# json.dumps writes a NUL as \u0000 and a backslash as \\: a NUL is a \u0000 after an even number of
# backslashes (r"\u0000" in the data is written \\u0000, six ordinary characters that jsonb stores).
_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _holds_nul(json_text: str) -> bool:
    return "\\u0000" in json_text and _ESCAPED_NUL.search(json_text) is not None


def _json_text(value: object) -> str:
    # Unescaped non-ASCII, so that a lone surrogate (no character, which jsonb refuses) fails here,
    # as UnicodeEncodeError (a ValueError), before anything is written.
    text = json.dumps(value, allow_nan=False, default=_json_default, ensure_ascii=False)
    text.encode("utf-8")
    return text


def _json_default(value: object) -> object:
    # Decimal amounts keep their exact digits as strings; anything else is an error.
    from decimal import Decimal

    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{value} is not a finite number")
        return str(value)
    if isinstance(value, Mapping):  # json.dumps takes dicts only; NewEvent takes any Mapping
        return dict(value)
    if isinstance(value, (datetime, uuid.UUID)):
        return value.isoformat() if isinstance(value, datetime) else str(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event as stored: `position` is its place in the global log."""

    id: uuid.UUID
    aggregate_id: str
    aggregate_type: str
    event_type: str
    data: dict[str, Any]
    metadata: dict[str, Any] | None
    version: int
    position: int
    created_at: datetime = field(compare=False)

    def shape_problem(self) -> str | None:
        """What makes this event other than its annotations say, or None. EventStore writes only
        JSON objects, but any producer can insert an array or a string into `events`."""
        if not isinstance(self.data, dict):
            return "data is not a JSON object"
        if self.metadata is not None and not isinstance(self.metadata, dict):
            return "metadata is neither a JSON object nor NULL"
        return None

    @classmethod
    def from_text_record(cls, record: Mapping[str, Any]) -> RecordedEvent:
        """From a row whose data and metadata come as JSON text (`data::text`): decoded here, one row
        at a time, whatever the connection's codecs, and a decoding error names the event."""
        try:
            data, metadata = _decode(record)
        except RecursionError:
            # json.loads recurses once per level, within what the caller's stack leaves of the
            # recursion limit: on a thread of its own, it goes as deep as json.dumps went for append.
            try:
                with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgprojector-json-decode") as fresh:
                    data, metadata = fresh.submit(_decode, record).result()
            except RecursionError:
                raise RecursionError(f"the event at position {record['position']}") from None
        return cls.from_record({**record, "data": data, "metadata": metadata})

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RecordedEvent:
        return cls(
            id=record["id"],
            aggregate_id=record["aggregate_id"],
            aggregate_type=record["aggregate_type"],
            event_type=record["event_type"],
            data=record["data"],
            metadata=record["metadata"],
            version=record["version"],
            position=record["position"],
            created_at=record["created_at"],
        )


def _decode(record: Mapping[str, Any]) -> tuple[Any, Any]:
    return json.loads(record["data"]), None if record["metadata"] is None else json.loads(record["metadata"])


def validate_stream(aggregate_id: str, aggregate_type: str) -> None:
    if not isinstance(aggregate_id, str) or not aggregate_id:
        raise InvalidEventError("aggregate_id must be a non-empty string")
    if len(aggregate_id) > MAX_AGGREGATE_ID:
        raise InvalidEventError(f"aggregate_id is longer than {MAX_AGGREGATE_ID} characters: {aggregate_id[:40]!r}...")
    _check_text("aggregate_id", aggregate_id)
    if not isinstance(aggregate_type, str) or not aggregate_type:
        raise InvalidEventError("aggregate_type must be a non-empty string")
    if len(aggregate_type) > MAX_AGGREGATE_TYPE:
        raise InvalidEventError(f"aggregate_type is longer than {MAX_AGGREGATE_TYPE} characters")
    _check_text("aggregate_type", aggregate_type)


def _check_text(name: str, value: str) -> None:
    if "\x00" in value:
        raise InvalidEventError(f"{name} contains a NUL character, which PostgreSQL text cannot store")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidEventError(f"{name} contains a lone surrogate (no character), which PostgreSQL text "
                                "cannot store") from None
