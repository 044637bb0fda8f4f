-- What 003 left to a producer's session, and what the log's own history can hide.
--
-- 1. Operators and functions, like tables, resolve through the search_path of the session that
-- inserts, and a producer sets its own: with a schema of its own ahead of pg_catalog, its
-- `+(bigint, integer)` made the statement trigger take a marker above the positions it drew (the
-- event skipped), and its `>(bigint, bigint)` let the row trigger pass a version gap (versions
-- applied out of order). So every function a producer's insert runs now resolves names in
-- pg_catalog alone: the functions that run once per statement set their search_path, and the row
-- trigger, where a setting set for every row costs about a tenth of a bulk insert, names each
-- operator `OPERATOR(pg_catalog.x)`. (tests/test_schema.py hijacks every operator they use.)
--
-- 2. A version below an aggregate's latest that its history does not hold is refused (23514), where
-- only a version above latest + 1 was: such a gap (left in a table adopted by 001, or by a producer
-- that got around the rule) filled in later would be read after the versions above it.
--
-- 3. The sequence is read with pg_sequence_last_value(), under the lock of its page, where 001 and
-- 003 read its row (`SELECT last_value FROM events_position_seq`) after the scan had let go of that
-- lock: every 32nd nextval() writes a value 32 ahead into the row, logs it and puts the real one
-- back, and a reader can catch the value ahead. The statement trigger then took a marker above the
-- positions its statement drew (a review's 16 producers hit it twice in 32,265 appends), and the
-- horizon could in the same way take a position not yet drawn for one drawn.
--
-- 4. A position drawn below the transaction's marker is refused (55000), naming the cause: with the
-- sequence's CACHE raised while producers run (the daemon checks it only at start), a session draws
-- from its own cache below the sequence's last value, and the horizon would pass such positions.
DO $migration$
DECLARE
    schema_name TEXT := (SELECT n.nspname FROM pg_catalog.pg_class c
                         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                         WHERE c.oid = 'events'::regclass);
BEGIN
    -- %1$I: the schema, as an identifier; %2$L: the sequence's qualified name, as a literal.
    EXECUTE format($function$
CREATE OR REPLACE FUNCTION %1$I.events_before_insert_statement() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    next_position BIGINT;
    marker TEXT := current_setting('pgprojector.in_flight_marker', true);
BEGIN
    -- Read the sequence BEFORE any row of this statement draws a position, so
    -- every position this statement draws is >= next_position. One marker per
    -- transaction, the lowest, held until its end (see 001). (NULL: no position drawn since
    -- the sequence was created or set with is_called false; 1 is below any it can draw.)
    next_position := coalesce(pg_sequence_last_value(%2$L::regclass) + 1, 1);
    IF marker IS NULL OR marker !~ '^[0-9]{1,18}$' OR marker::bigint > next_position THEN
        marker := next_position::text;
        PERFORM set_config('pgprojector.in_flight_marker', marker, true);
    END IF;
    PERFORM pg_advisory_xact_lock_shared(%1$I.pgprojector_marker_key1(marker::bigint),
                                         %1$I.pgprojector_marker_key2(marker::bigint));
    RETURN NULL;
END
$body$;

-- Every operator qualified: OPERATOR() binds like any operator, left to right, so each is in
-- parentheses.
CREATE OR REPLACE FUNCTION %1$I.events_before_insert_row() RETURNS trigger
LANGUAGE plpgsql AS $body$
DECLARE
    current_version BIGINT;
    current_type TEXT;
    marker BIGINT;
BEGIN
    -- Sees rows inserted earlier by the same statement, so a multi-row insert of
    -- versions 1, 2, 3 of one aggregate passes. The latest event, by the index on
    -- (aggregate_id, version), and its type.
    SELECT e.version, e.aggregate_type INTO current_version, current_type
      FROM %1$I.events e WHERE e.aggregate_id OPERATOR(pg_catalog.=) NEW.aggregate_id ORDER BY e.version DESC LIMIT 1;
    current_version := coalesce(current_version, 0);
    IF NEW.version IS NULL OR (NEW.version OPERATOR(pg_catalog.<) 1)
       OR (NEW.version OPERATOR(pg_catalog.>) (current_version OPERATOR(pg_catalog.+) 1)) THEN
        RAISE EXCEPTION 'aggregate %%: expected version %%, got %%',
                NEW.aggregate_id, current_version OPERATOR(pg_catalog.+) 1, coalesce(NEW.version::text, 'NULL')
            USING ERRCODE = 'check_violation',
                  HINT = 'versions of an aggregate start at 1 and go up by exactly one';
    END IF;
    -- A version at or below the latest is the conflict UNIQUE (aggregate_id, version) reports
    -- (23505), unless the history lacks it: only then does this look, once more by the index. (Two
    -- IFs: a condition with a subquery is a query of its own, run for every row.)
    IF NEW.version OPERATOR(pg_catalog.<=) current_version THEN
        IF NOT EXISTS (SELECT FROM %1$I.events e WHERE e.aggregate_id OPERATOR(pg_catalog.=) NEW.aggregate_id
                                                    AND e.version OPERATOR(pg_catalog.=) NEW.version) THEN
            RAISE EXCEPTION 'aggregate %%: expected version %%, got %%, a version its history lacks',
                    NEW.aggregate_id, current_version OPERATOR(pg_catalog.+) 1, NEW.version
                USING ERRCODE = 'check_violation',
                      HINT = 'a gap in an aggregate''s history is never filled in: the event would be read after the versions above it';
        END IF;
    END IF;
    -- The latest event's type is the first's, unless the stream mixed types before 003's rule: only
    -- an event of another type than the latest costs a second lookup, of the first.
    IF (current_version OPERATOR(pg_catalog.>) 0) AND (NEW.aggregate_type OPERATOR(pg_catalog.<>) current_type) THEN
        SELECT e.aggregate_type INTO current_type
          FROM %1$I.events e WHERE e.aggregate_id OPERATOR(pg_catalog.=) NEW.aggregate_id AND e.version OPERATOR(pg_catalog.=) 1;
        IF current_type IS NULL OR (NEW.aggregate_type OPERATOR(pg_catalog.<>) current_type) THEN
            RAISE EXCEPTION 'aggregate %%: is of type %%, not %%', NEW.aggregate_id, current_type, NEW.aggregate_type
                USING ERRCODE = 'check_violation',
                      HINT = 'every event of an aggregate has the aggregate_type of its first';
        END IF;
    END IF;
    NEW.position := pg_catalog.nextval(%2$L::regclass);
    -- The horizon holds only positions at or above the transaction's marker, which the statement
    -- trigger set from the sequence's last value: a position below it came from a session's cache.
    marker := pg_catalog.current_setting('pgprojector.in_flight_marker', true)::bigint;
    IF marker IS NULL OR (NEW.position OPERATOR(pg_catalog.<) marker) THEN
        RAISE EXCEPTION 'events_position_seq handed out position %%, below this transaction''s marker %%',
                NEW.position, coalesce(marker::text, 'NULL')
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('the read horizon needs ALTER SEQUENCE %%s CACHE 1 (pgprojector migrate sets it back)', %2$L);
    END IF;
    RETURN NEW;
END
$body$;

ALTER FUNCTION %1$I.events_notify() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION %1$I.events_refuse_change() SET search_path = pg_catalog, pg_temp;
-- (as in 001, but for how it reads the sequence; NULL: no position drawn since it was created or
-- set with is_called false, and 0 holds every projection below whatever it draws next)
CREATE OR REPLACE FUNCTION %1$I.pgprojector_horizon(OUT horizon BIGINT, OUT drawn BIGINT)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    lowest_in_flight BIGINT;
BEGIN
    drawn := coalesce(pg_sequence_last_value(%2$L::regclass), 0);
    SELECT min(marker) INTO lowest_in_flight FROM %1$I.pgprojector_in_flight_appenders;
    horizon := least(drawn, lowest_in_flight - 1);
END
$body$;
$function$, schema_name, pg_catalog.format('%I.events_position_seq', schema_name));
END
$migration$;
