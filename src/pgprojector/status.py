"""What `status` and `dead-letters` report, read straight from the database."""

from __future__ import annotations

from typing import Any

import asyncpg

from pgprojector.daemon import HEARTBEAT_SECONDS
from pgprojector.sqlfiles import queries

# A daemon whose heartbeat is older than this is taken for dead.
STALE_AFTER_SECONDS = 3 * HEARTBEAT_SECONDS


async def gather_status(conn: asyncpg.Connection) -> dict[str, Any]:
    sql = queries()
    head = await conn.fetchval(sql["head_position"])
    horizon, _drawn = await conn.fetchrow(sql["horizon"])
    blockers = await conn.fetch(sql["waiting_on"], horizon + 1)
    projections = []
    for row in await conn.fetch(sql["status"], STALE_AFTER_SECONDS):
        if row["state"] == "halted":
            state = "halted"
        elif row["state"] == "rebuilding":
            # Replayed by `pgprojector rebuild`: running while that session lives; after a crash,
            # stopped until someone runs the rebuild again.
            state = "running" if row["rebuild_active"] else "stopped"
        else:
            state = "running" if row["live"] else "stopped"
        projections.append({
            "name": row["name"],
            "position": row["position"],
            "lag": row["lag"],
            "state": state,
            "dead_letters": row["dead_letters"],
            "last_error": row["last_error"],
            "halted_at_position": row["halted_at_position"],
            "rebuilding": row["state"] == "rebuilding",
        })
    return {
        "head_position": head,
        "projections": projections,
        "horizon": horizon,
        "waiting_on": [
            {"pid": b["pid"], "from_position": b["marker"], "application_name": b["application_name"],
             "transaction_started": b["xact_start"].isoformat() if b["xact_start"] else None}
            for b in blockers
        ],
    }


async def dead_letters(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    return [
        {
            "id": row["id"], "projection": row["projection"], "position": row["event_position"],
            "event_id": str(row["event_id"]), "aggregate_id": row["aggregate_id"], "event_type": row["event_type"],
            "version": row["version"], "error": row["error"], "attempts": row["attempts"],
            "parked_at": row["parked_at"].isoformat(),
        }
        for row in await conn.fetch(queries()["dead_letters"])
    ]
