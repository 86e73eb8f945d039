-- 0010: targets seen in results are recorded in `targets` again. Until 0009 the insert trigger
-- added every target id it saw (so standalone agents' local targets have a row, which alert
-- rules with `targets = [...]`, `targets list` and the dashboard's target pages select by);
-- 0009 removed the trigger and nothing took this over, so a rule naming a local target never
-- fired (seen in `make demo`: "vantage-ingester alerts still exits 0"). The sink now calls this
-- in each write transaction, next to vantage_ensure_dims (existing rows are not locked).
CREATE FUNCTION vantage_ensure_targets(ids integer[]) RETURNS void
    LANGUAGE sql AS $$
    INSERT INTO targets (target_id)
    SELECT DISTINCT t FROM unnest(ids) AS t
     WHERE NOT EXISTS (SELECT 1 FROM targets AS g WHERE g.target_id = t)
     ORDER BY 1 ON CONFLICT DO NOTHING
$$;

-- The ids written while 0009 ran without it: every target with a result has a latest row, or
-- is in a write the rollup round has not taken yet.
INSERT INTO targets (target_id)
SELECT t FROM (SELECT target_id AS t FROM latest_results
               UNION
               SELECT unnest(l_targets) FROM rollup_pending) AS seen
 ORDER BY 1 ON CONFLICT DO NOTHING;
