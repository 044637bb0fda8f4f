-- Least-privilege group roles for the two kinds of clients of one pgprojector database.
--
--   pgprojector_producer   appends events and reads them back (EventStore, or plain INSERT)
--   pgprojector_projector  runs `pgprojector run` (and status, dead-letters, resume, rebuild)
--
-- Both are NOLOGIN: give each application its own login role and make it a member, e.g.
--   CREATE ROLE orders_api LOGIN PASSWORD '...' IN ROLE pgprojector_producer;
--   CREATE ROLE projector  LOGIN PASSWORD '...' IN ROLE pgprojector_projector;
-- `pgprojector migrate` itself keeps running as the owner of the schema: it creates tables.
--
-- Run after `pgprojector migrate`, as the owner of the tables (or a superuser), with
-- CREATEROLE; again after adding a projection. Idempotent, and safe to run in several databases
-- of one cluster (roles are cluster-wide, grants are per database).
--
-- On PostgreSQL 14 and older every role may CREATE in schema public; revoke that
-- (REVOKE CREATE ON SCHEMA public FROM PUBLIC) for these roles to stay least-privilege.
--
-- Security note: the event triggers run with the inserting role's rights (SECURITY INVOKER).
-- That is enough here and keeps them simple: the producer needs SELECT on `events` anyway (the
-- row trigger reads the aggregate's current version) and the sequence grants below.

DO $$
DECLARE
    group_role TEXT;
BEGIN
    FOREACH group_role IN ARRAY ARRAY['pgprojector_producer', 'pgprojector_projector'] LOOP
        BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = group_role) THEN
                EXECUTE format('CREATE ROLE %I NOLOGIN', group_role);
            END IF;
        EXCEPTION
            -- Another session (another database of the cluster) created it between the check and here.
            WHEN duplicate_object OR unique_violation THEN NULL;
        END;
    END LOOP;
END
$$;

DO $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO pgprojector_producer, pgprojector_projector', current_schema());
END
$$;

-- Producer: append and read. No UPDATE, DELETE or TRUNCATE (the triggers refuse them too, but a
-- privilege error comes first and names the real problem), and nothing on the read models.
GRANT SELECT, INSERT ON TABLE events TO pgprojector_producer;
-- events_before_insert_statement reads the sequence (pg_sequence_last_value: SELECT or USAGE);
-- events_before_insert_row draws the position with nextval (USAGE).
GRANT USAGE, SELECT ON SEQUENCE events_position_seq TO pgprojector_producer;
-- Called by the statement trigger to build its in-flight marker. EXECUTE is PUBLIC by default;
-- granted explicitly for databases where an administrator revoked that.
GRANT EXECUTE ON FUNCTION pgprojector_marker_key1(BIGINT), pgprojector_marker_key2(BIGINT)
    TO pgprojector_producer;

-- Projector: read the log, never write it.
GRANT SELECT ON TABLE events TO pgprojector_projector;
-- The read horizon: pgprojector_horizon() reads the sequence and the in-flight markers.
GRANT SELECT ON SEQUENCE events_position_seq TO pgprojector_projector;
GRANT SELECT ON TABLE pgprojector_in_flight_appenders TO pgprojector_projector;
GRANT EXECUTE ON FUNCTION pgprojector_horizon() TO pgprojector_projector;
-- The daemon refuses to start on a schema older than it needs.
GRANT SELECT ON TABLE pgprojector_migrations TO pgprojector_projector;
-- Checkpoints, dead letters, heartbeats.
GRANT SELECT, INSERT, UPDATE, DELETE
    ON TABLE pgprojector_projections, pgprojector_dead_letters, pgprojector_daemons
    TO pgprojector_projector;
GRANT USAGE, SELECT ON SEQUENCE pgprojector_dead_letters_id_seq TO pgprojector_projector;
-- `rebuild` runs as the projector too; its lock function and view come with migration 002.
DO $$
BEGIN
    IF to_regclass('pgprojector_active_rebuilds') IS NOT NULL THEN
        GRANT SELECT ON TABLE pgprojector_active_rebuilds TO pgprojector_projector;
    END IF;
    IF to_regprocedure('pgprojector_try_lock_rebuild(text)') IS NOT NULL THEN
        GRANT EXECUTE ON FUNCTION pgprojector_try_lock_rebuild(TEXT) TO pgprojector_projector;
    END IF;
END
$$;

-- The built-in read models and the projections' own memory tables: all of it (TRUNCATE
-- included, for `rebuild`). A projection that is not configured has no tables: skipped.
DO $$
DECLARE
    read_model TEXT;
BEGIN
    FOREACH read_model IN ARRAY ARRAY[
        'read_model_orders', 'read_model_dashboard', 'read_model_restaurant_daily',
        'projection_dashboard_orders', 'projection_analytics_orders'
    ] LOOP
        IF to_regclass(read_model) IS NOT NULL THEN
            EXECUTE format('GRANT ALL ON TABLE %I TO pgprojector_projector', read_model);
        END IF;
    END LOOP;
END
$$;
