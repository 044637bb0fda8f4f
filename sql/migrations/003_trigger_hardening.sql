-- Two things the insert triggers of 001 did not hold producers to.
--
-- 1. An aggregate is one stream of one type: every event of an aggregate_id has the aggregate_type
-- of its first. (A stream that mixed types before this migration may also go on with its latest.)
-- The built-in projections read the aggregate_type 'order'; an order's event appended as 'Order'
-- would be an event of that order they never see, its effect silently missing from every read
-- model.
--
-- 2. The insert triggers and the read horizon name every table, sequence and function of ours by its
-- schema (the schema `events` is in). Unqualified, a name resolves through the search_path of the
-- session that inserts, where temporary objects come first: a producer's TEMP SEQUENCE
-- events_position_seq would hand out positions the reader's horizon never covers (events skipped),
-- and a TEMP TABLE events (or a "$user" schema's own) would stand in for the log in the version
-- check (a gap accepted, later versions treated as replays). Qualified names cost nothing per row,
-- where `SET search_path` on the functions would set a setting on every inserted row.
-- The bodies are otherwise those of 001.
DO $migration$
DECLARE
    schema_name TEXT := (SELECT n.nspname FROM pg_catalog.pg_class c
                         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                         WHERE c.oid = 'events'::regclass);
BEGIN
    -- %1$I: the schema, as an identifier; %2$L: the sequence's qualified name, as a literal.
    EXECUTE format($function$
CREATE OR REPLACE FUNCTION %1$I.events_before_insert_statement() RETURNS trigger
LANGUAGE plpgsql AS $body$
DECLARE
    next_position BIGINT;
    marker TEXT := pg_catalog.current_setting('pgprojector.in_flight_marker', true);
BEGIN
    -- Read the sequence BEFORE any row of this statement draws a position, so
    -- every position this statement draws is >= next_position. One marker per
    -- transaction, the lowest, held until its end (see 001).
    SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END
      INTO next_position FROM %1$I.events_position_seq;
    IF marker IS NULL OR marker !~ '^[0-9]{1,18}$' OR marker::bigint > next_position THEN
        marker := next_position::text;
        PERFORM pg_catalog.set_config('pgprojector.in_flight_marker', marker, true);
    END IF;
    PERFORM pg_catalog.pg_advisory_xact_lock_shared(%1$I.pgprojector_marker_key1(marker::bigint),
                                                    %1$I.pgprojector_marker_key2(marker::bigint));
    RETURN NULL;
END
$body$;

CREATE OR REPLACE FUNCTION %1$I.events_before_insert_row() RETURNS trigger
LANGUAGE plpgsql AS $body$
DECLARE
    current_version BIGINT;
    current_type TEXT;
BEGIN
    -- Sees rows inserted earlier by the same statement, so a multi-row insert of
    -- versions 1, 2, 3 of one aggregate passes. The latest event, by the index on
    -- (aggregate_id, version), and its type.
    SELECT e.version, e.aggregate_type INTO current_version, current_type
      FROM %1$I.events e WHERE e.aggregate_id = NEW.aggregate_id ORDER BY e.version DESC LIMIT 1;
    current_version := coalesce(current_version, 0);
    IF NEW.version IS NULL OR NEW.version < 1 OR NEW.version > current_version + 1 THEN
        RAISE EXCEPTION 'aggregate %%: expected version %%, got %%',
                NEW.aggregate_id, current_version + 1, coalesce(NEW.version::text, 'NULL')
            USING ERRCODE = 'check_violation',
                  HINT = 'versions of an aggregate start at 1 and go up by exactly one';
    END IF;
    -- The latest event's type is the first's, unless the stream mixed types before this rule: only
    -- an event of another type than the latest costs a second lookup, of the first.
    IF current_version > 0 AND NEW.aggregate_type <> current_type THEN
        SELECT e.aggregate_type INTO current_type
          FROM %1$I.events e WHERE e.aggregate_id = NEW.aggregate_id AND e.version = 1;
        IF NEW.aggregate_type IS DISTINCT FROM current_type THEN
            RAISE EXCEPTION 'aggregate %%: is of type %%, not %%', NEW.aggregate_id, current_type, NEW.aggregate_type
                USING ERRCODE = 'check_violation',
                      HINT = 'every event of an aggregate has the aggregate_type of its first';
        END IF;
    END IF;
    NEW.position := pg_catalog.nextval(%2$L::regclass);
    RETURN NEW;
END
$body$;

CREATE OR REPLACE FUNCTION %1$I.pgprojector_horizon(OUT horizon BIGINT, OUT drawn BIGINT)
LANGUAGE plpgsql VOLATILE AS $body$
DECLARE
    lowest_in_flight BIGINT;
BEGIN
    SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END INTO drawn FROM %1$I.events_position_seq;
    SELECT min(marker) INTO lowest_in_flight FROM %1$I.pgprojector_in_flight_appenders;
    horizon := least(drawn, lowest_in_flight - 1);
END
$body$;
$function$, schema_name, pg_catalog.format('%I.events_position_seq', schema_name));
END
$migration$;
