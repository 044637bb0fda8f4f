-- Rebuilds: `pgprojector rebuild NAME` replays a projection from the start of the log while the
-- daemon runs. The checkpoint row says 'rebuilding' meanwhile: the daemon's worker applies
-- nothing for a projection that is not 'running', so only the rebuild moves that checkpoint.
ALTER TABLE pgprojector_projections DROP CONSTRAINT IF EXISTS pgprojector_projections_state_check;
ALTER TABLE pgprojector_projections ADD CONSTRAINT pgprojector_projections_state_check
    CHECK (state IN ('running', 'halted', 'stopped', 'rebuilding'));

-- A rebuild holds a session advisory lock for its whole run (two-int form, classid 0x70627264
-- "pbrd", outside the in-flight markers' range; objid = hashtext(name)). The lock ends with the
-- session, so a crashed rebuild is a 'rebuilding' row missing from pgprojector_active_rebuilds.
CREATE OR REPLACE FUNCTION pgprojector_try_lock_rebuild(projection TEXT) RETURNS BOOLEAN
LANGUAGE sql VOLATILE AS $$ SELECT pg_try_advisory_lock(1885434468, hashtext(projection)) $$;

CREATE OR REPLACE FUNCTION pgprojector_unlock_rebuild(projection TEXT) RETURNS BOOLEAN
LANGUAGE sql VOLATILE AS $$ SELECT pg_advisory_unlock(1885434468, hashtext(projection)) $$;

CREATE OR REPLACE VIEW pgprojector_active_rebuilds AS
SELECT p.name, l.pid
FROM pgprojector_projections p
JOIN pg_locks l
  ON l.locktype = 'advisory'
 AND l.objsubid = 2
 AND l.granted
 AND l.classid = 1885434468::oid
 AND l.objid = hashtext(p.name)::oid
 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database());
