"""Typed errors, each carrying what an operator or a caller needs to act on it."""

from __future__ import annotations


class PgProjectorError(Exception):
    """Base class of every error pgprojector raises on purpose."""


class ConfigError(PgProjectorError):
    """A missing or invalid setting; the message names the variable."""


class SchemaBehindError(ConfigError):
    """The database was migrated by an older pgprojector: `pgprojector migrate` brings it up to date.
    (The daemon waits for that, as in a rolling deploy where the new daemons start first.)"""


class InvalidEventError(PgProjectorError, ValueError):
    """An event refused before anything was written (bad aggregate id, empty type, data not JSON...)."""


class ConcurrencyError(PgProjectorError):
    """Another writer appended to the aggregate first: re-read, re-decide, retry."""

    def __init__(self, aggregate_id: str, expected_version: int, actual_version: int, *,
                 stale_snapshot: bool = False) -> None:
        self.aggregate_id = aggregate_id
        self.expected_version = expected_version
        self.actual_version = actual_version
        # The event that took the version was committed after the snapshot of the caller's REPEATABLE
        # READ or SERIALIZABLE transaction: actual_version is the least it can be, and re-reading inside
        # that transaction can never see it, so only a retry of the whole transaction helps.
        self.stale_snapshot = stale_snapshot
        super().__init__(
            f"aggregate {aggregate_id}: expected version {expected_version}, actual version {actual_version}"
            + (" or later, committed after this transaction's snapshot was taken (REPEATABLE READ or "
               "SERIALIZABLE): retry the whole transaction" if stale_snapshot else "")
        )


class RetriesExhaustedError(ConcurrencyError):
    """append_with_retry lost the race on every attempt: the versions are those of the last conflict."""

    def __init__(self, aggregate_id: str, attempts: int, last: ConcurrencyError) -> None:
        self.aggregate_id = aggregate_id
        self.expected_version = last.expected_version
        self.actual_version = last.actual_version
        self.stale_snapshot = last.stale_snapshot
        self.attempts = attempts
        self.last = last
        Exception.__init__(self, f"aggregate {aggregate_id}: still conflicting after {attempts} attempts ({last})")


class ProjectionError(PgProjectorError):
    """A projection could not apply an event (invalid data, missing predecessor...)."""

    def __init__(self, message: str, *, position: int | None = None, event_type: str | None = None) -> None:
        self.position = position
        self.event_type = event_type
        super().__init__(message)
