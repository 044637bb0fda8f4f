"""Loads the SQL that ships with the package: migrations, projection DDL, named queries."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

_QUERY_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def sql_root() -> Traversable:
    """`pgprojector/sql` in an installed wheel; the repository's top-level `sql/` in a source checkout."""
    packaged = resources.files("pgprojector") / "sql"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "sql"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError("pgprojector's SQL files are missing from this installation")


def read_sql(relative_path: str) -> str:
    node = sql_root()
    for part in relative_path.split("/"):
        node = node / part
    return node.read_text(encoding="utf-8")


def migrations() -> list[tuple[int, str, str]]:
    """(number, file name, SQL) of every migration, in order."""
    found = []
    for entry in (sql_root() / "migrations").iterdir():
        match = re.match(r"^(\d+)_\w+\.sql$", entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


@cache
def queries(file_name: str = "queries.sql") -> dict[str, str]:
    """The `-- name: foo` sections of a query file, by name."""
    text = read_sql(file_name)
    parts = _QUERY_HEADER.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}
