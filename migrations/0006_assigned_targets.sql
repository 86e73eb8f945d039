-- 0006 (issue #14): what each agent was given, so the sink can refuse results for targets it was
-- not (a compromised agent must not write for any target id), and certificate expiry per region,
-- so that one region never decides alone.

-- Assignments ------------------------------------------------------------------------------------
-- Every target id each published set held, since when and until when. `target_sets` holds only
-- the current sets, but after an apply the results probed under the previous generation are still
-- on their way (in flight, or in an agent's buffer): the sink accepts a result of a removed target
-- if it was probed before the target left the set (plus a grace, see ingester/src/assign.rs).
-- Kept by a trigger on target_sets, so whatever writes the sets keeps this in step, in the same
-- transaction.
CREATE TABLE target_assignments (
    region        text        NOT NULL,
    agent         text        NOT NULL DEFAULT '',   -- '' for the region's set
    target_id     integer     NOT NULL,
    assigned_at   timestamptz NOT NULL DEFAULT now(),
    unassigned_at timestamptz,                       -- NULL while the set holds it
    PRIMARY KEY (region, agent, target_id, assigned_at)
);
CREATE INDEX target_assignments_ended ON target_assignments (unassigned_at);

-- One row, bumped in the same transaction as every change of `target_sets`: the sink reads it
-- (one cheap query) to know when to read the assignments again, instead of a query per result.
CREATE TABLE target_assignments_version (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    version  bigint  NOT NULL
);
INSERT INTO target_assignments_version (version) VALUES (1);

-- The sets published so far (their true start is unknown: the last publication stands in).
INSERT INTO target_assignments (region, agent, target_id, assigned_at)
SELECT region, agent, unnest(target_ids), published_at FROM target_sets;

CREATE FUNCTION vantage_track_assignments() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE target_assignments SET unassigned_at = now()
         WHERE region = OLD.region AND agent = OLD.agent AND unassigned_at IS NULL
           AND (TG_OP = 'DELETE' OR NOT target_id = ANY (NEW.target_ids));
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO target_assignments (region, agent, target_id)
        SELECT NEW.region, NEW.agent, id FROM unnest(NEW.target_ids) AS id
         WHERE NOT EXISTS (SELECT 1 FROM target_assignments a
                            WHERE a.region = NEW.region AND a.agent = NEW.agent
                              AND a.target_id = id AND a.unassigned_at IS NULL);
    END IF;
    UPDATE target_assignments_version SET version = version + 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER target_sets_assignments
    AFTER INSERT OR UPDATE OR DELETE ON target_sets
    FOR EACH ROW EXECUTE FUNCTION vantage_track_assignments();

-- Certificate expiry ------------------------------------------------------------------------------
-- Per target and region, as last seen from that region (latest_results).
CREATE VIEW cert_expiry_by_region AS
SELECT target_id, region, agent, cert_not_after AS not_after, cert_not_after - now() AS remaining,
       started_at AS seen_at
  FROM latest_results
 WHERE cert_not_after IS NOT NULL;

-- Per target. `not_after` was the minimum over regions, so one agent's claim made any certificate
-- look expiring. Now it is the soonest expiry at least two regions see (the second soonest of the
-- regions' values); with one region reporting, that region's (it is the only witness, and the
-- `regions` column says so). The same columns as before, in the same order, then: `regions`
-- (how many report), `soonest` and `soonest_from` (the earliest value and the region claiming it:
-- worth a look, not an alert on its own).
CREATE OR REPLACE VIEW cert_expiry AS
SELECT target_id,
       (array_agg(cert_not_after ORDER BY cert_not_after))[least(count(*), 2)] AS not_after,
       (array_agg(cert_not_after ORDER BY cert_not_after))[least(count(*), 2)] - now() AS remaining,
       array_agg(region ORDER BY region) AS seen_from,
       count(*)::integer AS regions,
       min(cert_not_after) AS soonest,
       (array_agg(region ORDER BY cert_not_after, region))[1] AS soonest_from
  FROM latest_results
 WHERE cert_not_after IS NOT NULL
 GROUP BY target_id
 ORDER BY not_after;
