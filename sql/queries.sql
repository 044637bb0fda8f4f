-- Named queries, loaded by pgprojector.sqlfiles.queries(): `-- name: <key>` starts each one.

-- name: append_events
-- One statement for the whole list: one transaction, one NOTIFY, versions
-- expected+1.. in list order (the row trigger checks each against the last). The JSON goes as text
-- and is cast here: whatever jsonb codec the caller's connection has (none, or its own json.dumps)
-- cannot decide how it is stored.
INSERT INTO events (aggregate_id, aggregate_type, event_type, data, metadata, version)
SELECT $1, $2, e.event_type, e.data::jsonb, e.metadata::jsonb, $6::bigint + e.n
FROM unnest($3::text[], $4::text[], $5::text[]) WITH ORDINALITY AS e(event_type, data, metadata, n)
ORDER BY e.n
RETURNING position

-- name: is_version_key
-- Whether the unique index $2 in schema $1 that an append violated is the one on (aggregate_id,
-- version): a database adopted from the seed's schema may have given it a name of its own.
SELECT EXISTS (
    SELECT FROM pg_catalog.pg_index i
    JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = $1 AND c.relname = $2 AND i.indisunique AND i.indnatts = 2
      AND ARRAY(SELECT a.attname::text
                FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
                JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                ORDER BY k.n) = ARRAY['aggregate_id', 'version'])

-- name: current_version
SELECT coalesce(max(version), 0) FROM events WHERE aggregate_id = $1

-- name: read_stream
-- (data and metadata as text, decoded by EventStore: the caller's connection may have any jsonb codec)
SELECT id, aggregate_id, aggregate_type, event_type, data::text, metadata::text, version, position, created_at
FROM events WHERE aggregate_id = $1
ORDER BY version

-- name: read_stream_as_of
-- The longest prefix of the history created at or before $2. created_at is the appending transaction's
-- start, and a transaction that began before version n was appended can append n + 1: filtering on
-- created_at alone could return version n + 1 without version n.
SELECT id, aggregate_id, aggregate_type, event_type, data::text, metadata::text, version, position, created_at
FROM events
WHERE aggregate_id = $1 AND created_at <= $2
  AND version < coalesce((SELECT min(l.version) FROM events l WHERE l.aggregate_id = $1 AND l.created_at > $2),
                         9223372036854775807)
ORDER BY version

-- name: session_timeouts
-- The server's limits on a daemon session that are not off (for its start-up log line): each can end
-- a batch (see worker.py), and an operator looking at one that keeps failing wants to know them.
SELECT name, setting, unit FROM pg_catalog.pg_settings
WHERE name IN ('statement_timeout', 'lock_timeout', 'idle_in_transaction_session_timeout') AND setting <> '0'
ORDER BY name

-- name: end_start_up_session
-- The daemon's own start-up backend, by pid (and name, should the pid be someone else's by now).
SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = $1 AND application_name = 'pgprojector-daemon'

-- name: horizon
SELECT horizon, drawn FROM pgprojector_horizon()

-- name: read_batch
-- Always after pgprojector_horizon(), in a later statement (a later snapshot).
SELECT id, aggregate_id, aggregate_type, event_type, data, metadata, version, position, created_at
FROM events
WHERE position > $1 AND position <= $2 AND ($3::text[] IS NULL OR event_type = ANY($3::text[]))
ORDER BY position
LIMIT $4

-- name: next_position
-- The next wanted event's position after $1, up to $2.
SELECT position FROM events
WHERE position > $1 AND position <= $2 AND ($3::text[] IS NULL OR event_type = ANY($3::text[]))
ORDER BY position
LIMIT 1

-- name: count_range
-- How many wanted events a range handler's batch, positions ($1, $2], held (when it does not say).
SELECT count(*) FROM events
WHERE position > $1 AND position <= $2 AND ($3::text[] IS NULL OR event_type = ANY($3::text[]))

-- name: event_at
SELECT id, aggregate_id, event_type, version, position FROM events WHERE position = $1

-- name: lock_checkpoint
-- Every batch holds its projection's row lock until it commits: a second
-- daemon (or a rebuild) waits here, then reads the checkpoint the first one left.
SELECT position, state FROM pgprojector_projections WHERE name = $1 FOR UPDATE

-- name: save_checkpoint
UPDATE pgprojector_projections SET position = $2, updated_at = now() WHERE name = $1

-- name: halt_projection
UPDATE pgprojector_projections
SET state = 'halted', halted_at_position = $2, last_error = $3, updated_at = now()
WHERE name = $1

-- name: lock_halted
SELECT halted_at_position, last_error FROM pgprojector_projections WHERE name = $1 AND state = 'halted' FOR UPDATE

-- name: park_halted_event
-- `resume --park`: the event the projection halted at, parked with the error it halted on.
INSERT INTO pgprojector_dead_letters (projection, event_position, event_id, error, attempts)
SELECT p.name, e.position, e.id, coalesce(p.last_error, 'halted'), 1
FROM pgprojector_projections p JOIN events e ON e.position = p.halted_at_position
WHERE p.name = $1
ON CONFLICT (projection, event_position) DO UPDATE SET error = EXCLUDED.error, parked_at = now()
RETURNING id

-- name: resume_projection
-- last_error stays what `status` shows for a parked event ($2), as when the daemon parks one.
UPDATE pgprojector_projections
SET state = 'running', halted_at_position = NULL, last_error = $2, updated_at = now()
WHERE name = $1

-- name: park_event
INSERT INTO pgprojector_dead_letters (projection, event_position, event_id, error, attempts)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (projection, event_position) DO UPDATE
SET error = EXCLUDED.error, attempts = EXCLUDED.attempts, parked_at = now()

-- name: record_error
UPDATE pgprojector_projections SET last_error = $2, updated_at = now() WHERE name = $1

-- name: waiting_on
-- Open transactions that appended events and hold the horizon back.
SELECT a.pid, a.marker, s.xact_start, s.application_name, s.state
FROM pgprojector_in_flight_appenders a
LEFT JOIN pg_stat_activity s ON s.pid = a.pid
WHERE a.marker <= $1
ORDER BY a.marker
LIMIT 5

-- name: head_position
SELECT max(position) FROM events

-- name: register_daemon
INSERT INTO pgprojector_daemons (id, hostname, pid, projections) VALUES ($1, $2, $3, $4)

-- name: heartbeat
UPDATE pgprojector_daemons SET heartbeat_at = now() WHERE id = $1

-- name: unregister_daemon
DELETE FROM pgprojector_daemons WHERE id = $1 OR heartbeat_at < now() - interval '1 day'

-- name: status
SELECT p.name, p.position, p.state, p.halted_at_position, p.last_error,
       (SELECT count(*) FROM events e WHERE e.position > p.position) AS lag,
       (SELECT count(*) FROM pgprojector_dead_letters d WHERE d.projection = p.name) AS dead_letters,
       EXISTS (SELECT 1 FROM pgprojector_daemons d
               WHERE p.name = ANY(d.projections) AND d.heartbeat_at > now() - make_interval(secs => $1)) AS live,
       EXISTS (SELECT 1 FROM pgprojector_active_rebuilds r WHERE r.name = p.name) AS rebuild_active
FROM pgprojector_projections p
ORDER BY p.name

-- name: dead_letters
SELECT d.id, d.projection, d.event_position, d.event_id, d.error, d.attempts, d.parked_at,
       e.aggregate_id, e.event_type, e.version
FROM pgprojector_dead_letters d LEFT JOIN events e ON e.position = d.event_position
ORDER BY d.id

-- name: backend_activity
-- What a worker's backend is doing, for the daemon's batch_slow line: its state, what it waits on,
-- and who holds what it waits for.
SELECT a.state AS backend, a.wait_event_type, a.wait_event,
       extract(epoch FROM now() - a.state_change)::int AS in_state_s,
       ARRAY(SELECT b.pid || ' ' || coalesce(nullif(b.application_name, ''), '?') || ': ' || left(b.query, 80)
             FROM pg_stat_activity b WHERE b.pid = ANY (pg_blocking_pids(a.pid))) AS blocked_by
FROM pg_stat_activity a
WHERE a.pid = $1
