-- 0012: the alert stage's reads cost what is failing, not what exists (issue #16 item 1).
--
-- 0007's vantage_alert_down and vantage_alert_regions read latest_status, whose view
-- (vantage_latest, 0009) orders every target x region row with the pending ones to pick the
-- newest: at 10,000 targets x 10 regions that sort is the whole cost of an evaluation, and it
-- grows with the pending writes (one lookup in results_raw per pending pair). Here, same
-- signatures and the same answers (tests/alerts.rs compares them with 0007's on one data set):
--
-- * `down` finds its candidates through a partial index of failing latest rows and the pending
--   pairs' up flag, then reads only the candidates' rows (and looks up only their pending
--   results);
-- * `no_data` takes the newest time per pair without ordering the rows, and the pending times
--   without looking anything up.
--
-- vantage_latest itself is unchanged (users' latest_status, the dashboard).

-- The newest pending time per target and region (writes the round has not consumed yet) and
-- whether that result was up (`l_up`, written by the sink from 0012 on; NULL for rows of an older
-- sink, read as "perhaps not"). No lookup of results_raw: the reads below look up only the few
-- pairs they need. With two newest results at the same time, the one not up (or unknown) is
-- kept, so a failing one is never hidden.
ALTER TABLE rollup_pending ADD COLUMN l_up boolean[];

CREATE VIEW vantage_pending_times AS
SELECT DISTINCT ON (y.t, y.r) y.t AS target_id, y.r AS region, y.s AS started_at, y.up
  FROM rollup_pending AS d, unnest(d.l_targets, d.l_regions, d.l_started, d.l_up) AS y(t, r, s, up)
 ORDER BY y.t, y.r, y.s DESC, y.up NULLS FIRST;

-- Failing latest rows are few: the candidates of `down` are found by this index alone.
CREATE INDEX latest_results_failing ON latest_results (target_id) WHERE outcome <> 'up';

DROP FUNCTION vantage_alert_down(interval, integer[], text[], text[], integer[]);
CREATE FUNCTION vantage_alert_down(fresh interval, target_ids integer[], target_names text[],
                                   only_regions text[], tracked integer[])
    RETURNS TABLE (target_id integer, target_name text, retired boolean, reporting integer,
                   failing integer, failing_regions text[], failing_outcomes text[])
    LANGUAGE sql STABLE AS $$
    WITH pending_times AS MATERIALIZED (
        SELECT * FROM vantage_pending_times
    ), chosen AS (
        SELECT t.target_id FROM targets AS t
         WHERE t.target_id = ANY (target_ids) OR t.name = ANY (target_names)
    ), candidates AS (
        -- Targets failing somewhere (fresh), from the partial index and the pending rows, and
        -- those remembered: a quiet fleet costs an index probe, not a scan of every target.
        SELECT l.target_id FROM latest_results AS l
         WHERE l.outcome <> 'up' AND l.started_at >= now() - fresh
        UNION
        SELECT p.target_id FROM pending_times AS p
         WHERE p.up IS NOT TRUE AND p.started_at >= now() - fresh
        UNION
        SELECT unnest(tracked)
    ), chosen_candidates AS (
        SELECT c.target_id FROM candidates AS c
         WHERE (target_ids IS NULL AND target_names IS NULL)
            OR c.target_id IN (SELECT x.target_id FROM chosen AS x)
    ), pending AS (
        -- The candidates' pending results, as vantage_latest reads them.
        SELECT r.target_id, t.region, a.agent, r.started_at, o.outcome
          FROM chosen_candidates AS c
          JOIN pending_times AS t USING (target_id)
          JOIN regions AS g ON g.region = t.region
          JOIN results_raw AS r ON r.target_id = t.target_id AND r.started_at = t.started_at
                               AND r.region_id = g.region_id
          JOIN agents AS a ON a.agent_id = r.agent_id
          JOIN outcomes AS o ON o.outcome_id = r.outcome_id
    ), latest AS (
        -- vantage_latest's rule (newest started_at, then agent) for the candidates' rows only.
        SELECT DISTINCT ON (x.target_id, x.region) x.target_id, x.region, x.started_at, x.outcome
          FROM (SELECT l.target_id, l.region, l.agent, l.started_at, l.outcome
                  FROM chosen_candidates AS c JOIN latest_results AS l USING (target_id)
                UNION ALL
                SELECT p.target_id, p.region, p.agent, p.started_at, p.outcome
                  FROM pending AS p) AS x
         WHERE only_regions IS NULL OR x.region = ANY (only_regions)
         ORDER BY x.target_id, x.region, x.started_at DESC, x.agent
    ), per AS (
        SELECT s.target_id,
               count(*) FILTER (WHERE s.started_at >= now() - fresh)::integer AS reporting,
               count(*) FILTER (WHERE s.started_at >= now() - fresh AND s.outcome <> 'up')::integer AS failing,
               array_agg(s.region ORDER BY s.region)
                   FILTER (WHERE s.started_at >= now() - fresh AND s.outcome <> 'up') AS regions,
               array_agg(s.outcome ORDER BY s.region)
                   FILTER (WHERE s.started_at >= now() - fresh AND s.outcome <> 'up') AS outcomes
          FROM latest AS s
         GROUP BY s.target_id
    )
    SELECT p.target_id, t.name, t.retired_at IS NOT NULL, p.reporting, p.failing,
           coalesce(p.regions, '{}'), coalesce(p.outcomes, '{}')
      FROM per AS p
      LEFT JOIN targets AS t USING (target_id)
     WHERE p.failing > 0 OR p.target_id = ANY (tracked)
$$;

DROP FUNCTION vantage_alert_regions(interval, interval, text[]);
CREATE FUNCTION vantage_alert_regions(fresh interval, forget interval, only_regions text[])
    RETURNS TABLE (region text, last_result timestamptz, fresh_targets integer, targets integer)
    LANGUAGE sql STABLE AS $$
    WITH pending AS MATERIALIZED (
        SELECT p.target_id, p.region, p.started_at FROM vantage_pending_times AS p
    ), latest AS (
        -- The newest time per target and region, as vantage_latest has it, without ordering
        -- every row: latest_results, moved on by a newer pending row, plus pending-only pairs.
        SELECT l.region, greatest(l.started_at, p.started_at) AS started_at
          FROM latest_results AS l
          LEFT JOIN pending AS p ON p.target_id = l.target_id AND p.region = l.region
        UNION ALL
        SELECT p.region, p.started_at FROM pending AS p
         WHERE NOT EXISTS (SELECT 1 FROM latest_results AS l
                            WHERE l.target_id = p.target_id AND l.region = p.region)
    )
    SELECT s.region, max(s.started_at),
           count(*) FILTER (WHERE s.started_at >= now() - fresh)::integer, count(*)::integer
      FROM latest AS s
     WHERE s.started_at >= now() - forget
       AND (only_regions IS NULL OR s.region = ANY (only_regions))
     GROUP BY s.region
$$;
