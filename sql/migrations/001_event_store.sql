-- The event store: the seed's `events` table plus a global position, and the
-- rules every producer is held to, whatever client it uses.

CREATE TABLE IF NOT EXISTS events (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregate_id VARCHAR(100) NOT NULL,
    aggregate_type VARCHAR(50) NOT NULL,
    event_type VARCHAR(100) NOT NULL,
    data JSONB NOT NULL,
    metadata JSONB,
    version BIGINT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    -- Filled by events_before_insert_row; a producer cannot choose it.
    position BIGINT NOT NULL UNIQUE,

    UNIQUE (aggregate_id, version)
);

-- A database made from the seed's schema has an `events` table without `position`: it is adopted.
-- Its events get positions in an order that keeps each aggregate's versions in order, which
-- created_at alone need not (it is the appending transaction's start: a transaction that began
-- before version n was appended can append n + 1): by the latest created_at among the aggregate's
-- events up to that version, then by aggregate and version. (No trigger refuses the UPDATE yet:
-- they are created below, in this same transaction.)
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_attribute
                   WHERE attrelid = 'events'::regclass AND attname = 'position' AND NOT attisdropped) THEN
        ALTER TABLE events ADD COLUMN position BIGINT;
        UPDATE events e SET position = ordered.position
        FROM (SELECT id, row_number() OVER (ORDER BY settled_at, aggregate_id, version) AS position
              FROM (SELECT id, aggregate_id, version,
                           max(created_at) OVER (PARTITION BY aggregate_id ORDER BY version) AS settled_at
                    FROM events) settled) ordered
        WHERE e.id = ordered.id;
        ALTER TABLE events ALTER COLUMN position SET NOT NULL, ADD UNIQUE (position);
        RAISE INFO 'events: adopted, % events given positions', (SELECT count(*) FROM events);
    END IF;
END
$$;

CREATE INDEX IF NOT EXISTS idx_events_aggregate ON events (aggregate_id, version);
CREATE INDEX IF NOT EXISTS idx_events_type ON events (event_type);
CREATE INDEX IF NOT EXISTS idx_events_created ON events (created_at);
CREATE INDEX IF NOT EXISTS idx_events_aggregate_time ON events (aggregate_id, created_at);

-- CACHE 1 matters: the read horizon relies on last_value being the highest
-- position any session has drawn.
CREATE SEQUENCE IF NOT EXISTS events_position_seq AS BIGINT CACHE 1 OWNED BY events.position;
-- (after an adoption: new events go after the positions given above)
SELECT setval('events_position_seq', max(position)) FROM events HAVING max(position) IS NOT NULL;

-- In-flight appenders. Every transaction that inserts into `events` first takes
-- a transaction-scoped SHARED advisory lock whose key encodes the lowest
-- position it can still draw (see sql/migrations and README "Reading the log").
-- A reader lists these locks in pg_locks to find the positions that may still
-- appear. Key layout (two-int form, objsubid = 2): classid = 0x7067 << 16 |
-- bits 32..47 of the marker, objid = bits 0..31. Positions fit in 48 bits.
CREATE OR REPLACE FUNCTION pgprojector_marker_key1(marker BIGINT) RETURNS INTEGER
LANGUAGE sql IMMUTABLE AS $$ SELECT ((28775::bigint << 16) | (marker >> 32))::integer $$;

CREATE OR REPLACE FUNCTION pgprojector_marker_key2(marker BIGINT) RETURNS INTEGER
LANGUAGE sql IMMUTABLE AS $$
    SELECT (CASE WHEN (marker & 4294967295) >= 2147483648
                 THEN (marker & 4294967295) - 4294967296
                 ELSE (marker & 4294967295) END)::integer
$$;

CREATE OR REPLACE VIEW pgprojector_in_flight_appenders AS
SELECT l.pid,
       ((l.classid::bigint & 65535) << 32) | l.objid::bigint AS marker
FROM pg_locks l
WHERE l.locktype = 'advisory'
  AND l.objsubid = 2
  AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND (l.classid::bigint >> 16) = 28775;

CREATE OR REPLACE FUNCTION events_before_insert_statement() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    next_position BIGINT;
    marker TEXT := current_setting('pgprojector.in_flight_marker', true);
BEGIN
    -- Read the sequence BEFORE any row of this statement draws a position, so
    -- every position this statement draws is >= next_position.
    SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END
      INTO next_position FROM events_position_seq;
    -- One marker per transaction: the first is the lowest, held until the end
    -- (the setting is transaction-local and undone with a rolled-back
    -- savepoint, exactly like the lock). It is taken again on every statement,
    -- which costs nothing for a lock already held, and a value a client set
    -- itself is only used when it is not above next_position: a forged marker
    -- can hold the horizon back, never let it pass an uncommitted position.
    IF marker IS NULL OR marker !~ '^[0-9]{1,18}$' OR marker::bigint > next_position THEN
        marker := next_position::text;
        PERFORM set_config('pgprojector.in_flight_marker', marker, true);
    END IF;
    PERFORM pg_advisory_xact_lock_shared(pgprojector_marker_key1(marker::bigint),
                                         pgprojector_marker_key2(marker::bigint));
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION events_before_insert_row() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    current_version BIGINT;
BEGIN
    -- Sees rows inserted earlier by the same statement, so a multi-row insert of
    -- versions 1, 2, 3 of one aggregate passes.
    SELECT max(e.version) INTO current_version FROM events e WHERE e.aggregate_id = NEW.aggregate_id;
    current_version := coalesce(current_version, 0);
    IF NEW.version IS NULL OR NEW.version < 1 OR NEW.version > current_version + 1 THEN
        RAISE EXCEPTION 'aggregate %: expected version %, got %',
                NEW.aggregate_id, current_version + 1, coalesce(NEW.version::text, 'NULL')
            USING ERRCODE = 'check_violation',
                  HINT = 'versions of an aggregate start at 1 and go up by exactly one';
    END IF;
    NEW.position := nextval('events_position_seq');
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION events_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Constant payload: PostgreSQL folds identical notifications of one
    -- transaction into one, and listeners always read from their checkpoint.
    PERFORM pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'feature_not_supported';
END
$$;

DROP TRIGGER IF EXISTS events_before_insert_statement ON events;
CREATE TRIGGER events_before_insert_statement BEFORE INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_before_insert_statement();

DROP TRIGGER IF EXISTS events_before_insert_row ON events;
CREATE TRIGGER events_before_insert_row BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_before_insert_row();

DROP TRIGGER IF EXISTS events_refuse_update_delete ON events;
CREATE TRIGGER events_refuse_update_delete BEFORE UPDATE OR DELETE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();

DROP TRIGGER IF EXISTS events_refuse_truncate ON events;
CREATE TRIGGER events_refuse_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();

-- `horizon`: the highest position at or below which every committed event is
-- visible and no new one can appear; `drawn`: the highest position handed out. Steps in this order, each its own statement: (1) the
-- sequence, (2) the in-flight markers; the caller then reads the rows in a
-- later statement (a later snapshot). A transaction that drew a position <= (1)
-- took its marker before drawing; at (2) it is either still listed, or has
-- ended and its rows are visible to the caller's later snapshot.
CREATE OR REPLACE FUNCTION pgprojector_horizon(OUT horizon BIGINT, OUT drawn BIGINT)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    lowest_in_flight BIGINT;
BEGIN
    SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END INTO drawn FROM events_position_seq;
    SELECT min(marker) INTO lowest_in_flight FROM pgprojector_in_flight_appenders;
    horizon := least(drawn, lowest_in_flight - 1);
END
$$;

-- Projection checkpoints: one row per projection, locked FOR UPDATE by every
-- batch, so two daemons (or a daemon and a rebuild) never apply the same
-- events twice: they take turns.
CREATE TABLE IF NOT EXISTS pgprojector_projections (
    name TEXT PRIMARY KEY,
    position BIGINT NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'halted', 'stopped')),
    halted_at_position BIGINT,
    last_error TEXT,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS pgprojector_dead_letters (
    id BIGSERIAL PRIMARY KEY,
    projection TEXT NOT NULL,
    event_position BIGINT NOT NULL,
    event_id UUID NOT NULL,
    error TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    parked_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (projection, event_position)
);

-- The NOTIFY trigger names its channel as a trigger argument; `migrate` points
-- it at PGPROJECTOR_CHANNEL (an identifier, validated by the settings).
CREATE OR REPLACE FUNCTION pgprojector_set_notify_channel(channel TEXT) RETURNS VOID
LANGUAGE plpgsql AS $$
BEGIN
    DROP TRIGGER IF EXISTS events_notify ON events;
    EXECUTE format('CREATE TRIGGER events_notify AFTER INSERT ON events '
                   'FOR EACH STATEMENT EXECUTE FUNCTION events_notify(%L)', channel);
END
$$;

-- Running daemons and their heartbeats: `status` and `health` tell a live
-- daemon from a dead one by the age of heartbeat_at.
CREATE TABLE IF NOT EXISTS pgprojector_daemons (
    id UUID PRIMARY KEY,
    hostname TEXT NOT NULL,
    pid INTEGER NOT NULL,
    projections TEXT[] NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
