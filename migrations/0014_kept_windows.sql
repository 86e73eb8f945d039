-- 0014 (issues #15 item 3, #17 item 4): the region comparison of every target over 24 hours,
-- 7 days and 30 days without merging histograms at read time.
--
-- Why: `region_comparison` merged every rollup row of the window per target x region and walked
-- the merged histogram in rows (unnest -> GROUP BY bucket -> sort -> running sums -> the
-- percentiles). For 1,000 series over 24 hours that is 125,000 entries merged into 75,000 at
-- ~3 us each, more than reading the raw rows; over 30 days 2 million. The 75,000 distinct
-- (series, bucket) entries are the floor of any merge in SQL rows, so keeping the merged window
-- ready and merging it again at read time (with the part of the window it lacks) does not help
-- much: the merge itself is the cost.
--
-- What instead: a **kept window** per series (`kept_windows`) holds the merge of the rollup rows
-- from a start (`kept_window_spans.from_ts`) on, with its histogram also as two aligned arrays,
-- the bucket ids and the cumulative counts. A percentile of a histogram in that form is one
-- binary search in C (`width_bucket` over the cumulative counts). What the read needs besides
-- (the raw rows above the watermark, the rows between the window's start now and the kept
-- start, added or subtracted) is small, and is combined without merging the kept histogram: for
-- the sorted buckets t_1 < ... < t_p of that small part, with running sums CT_j, the merged
-- cumulative count is F(b) = F_kept(b) + CT_j for t_j <= b < t_(j+1), so the smallest bucket with
-- F(b) >= rank lies in interval j = how many t_j have F(t_j) < rank (a binary search over the
-- F(t_j)), at the first kept bucket there where the kept histogram reaches rank - CT_j (a binary
-- search over the kept cumulative counts), or else at t_(j+1). Per series and percentile that is
-- two binary searches, plus one per bucket of the small part. Exact: the same bucket the old
-- walk over the merged histogram picks (tests/storage.rs region_comparison_answers_as_0009_did
-- compares the answers with 0009's function kept as a baseline, EXCEPT ALL both ways).
--
-- Which windows are kept: `kept_window_spans` (24 hours over hourly rows, 7 and 30 days over
-- daily rows: the windows of the dashboard's overview and heatmap and of `report`'s default).
-- `region_comparison(since)` uses a kept window when one has span = since; any other window is
-- read as before.
--
-- How they stay exact (the invariant: a kept window = the merge of its level's `_data` rows with
-- bucket >= from_ts, per series):
--   * Only the rollup round writes the `_data` tables; in the same statement that replaces
--     hourly rows it adds (new - old) of the replaced hours to every kept window that covers them
--     (a daily row changes by exactly the change of its hours, so the same delta serves both
--     levels).
--   * After that, the round moves each window's start to date_trunc(unit, now() - span): the rows
--     it leaves behind are subtracted. A window without a start (new, or invalidated) is built
--     from its rows.
--   * Any other write to `rollup_1h_data` or `rollup_1d_data` (vantage_migrate_v8, a hand edit)
--     invalidates every kept window (a statement trigger; the round tells it apart by a
--     transaction-local setting), and the next round rebuilds them. Until then the reads take
--     the old path, so an invalid window is never read.
--   * Partitions dropped (retention) or attached change the rows without a DML statement: the
--     round compares each level's partitions with those the window was built on and rebuilds it
--     when they differ (retention drops a month at a time, so about once a month).
--   * Reads correct for the start having moved since the round (an hour or a day boundary
--     passed) by the rows in between, so a read is never behind a round.

CREATE TABLE kept_window_spans (
    win     smallint    PRIMARY KEY,
    unit    text        NOT NULL CHECK (unit IN ('hour', 'day')),
    span    interval    NOT NULL UNIQUE,
    from_ts timestamptz,            -- NULL: not built (the next round builds it)
    parts   text[]                  -- the level's partitions when it was built or last moved
);
INSERT INTO kept_window_spans (win, unit, span) VALUES
    (1, 'hour', interval '24 hours'),
    (2, 'day', interval '7 days'),
    (3, 'day', interval '30 days');

-- One row per window x target x region with a probe in it. The histogram of total time as bucket
-- ids and cumulative counts (`vantage_kept_hist` gives it back as packed entries for the round's
-- merges). Not also kept packed: without it a row stays under the TOAST threshold (a couple of
-- hundred buckets), so reads find the arrays uncompressed in the row.
CREATE TABLE kept_windows (
    win        smallint NOT NULL,
    target_id  integer  NOT NULL,
    region_id  smallint NOT NULL,
    probes     bigint   NOT NULL,
    up         bigint   NOT NULL,
    outcomes   jsonb    NOT NULL,
    buckets    integer[] NOT NULL,
    cum        int8[]   NOT NULL,
    PRIMARY KEY (win, target_id, region_id)
);

-- A kept histogram as packed entries (vantage_hist_entries' form).
CREATE FUNCTION vantage_kept_hist(buckets integer[], cum int8[]) RETURNS int8[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN (SELECT coalesce(array_agg(vantage_hist_entry(u.b, u.c - coalesce(cum[u.i - 1], 0))
                                      ORDER BY u.i), '{}')
              FROM unnest(buckets, cum) WITH ORDINALITY AS u(b, c, i));

-- The kept window rows of `source` (rows with columns sign, win, target_id, region_id, probes,
-- up, outcomes, total_hist), merged per window and series: counts added (signed), histogram
-- entries added (entries and outcomes that sum to 0 dropped), as a query text.
CREATE FUNCTION vantage_window_merge_sql(source text) RETURNS text
    LANGUAGE sql IMMUTABLE
    RETURN format($q$
    WITH s AS MATERIALIZED (SELECT sign, win, target_id, region_id, probes, up, outcomes,
                                   total_hist FROM %1$s),
    counts AS (
        SELECT win, target_id, region_id, sum(sign * probes)::int8 AS probes,
               sum(sign * up)::int8 AS up
          FROM s GROUP BY 1, 2, 3
    ), mix AS (
        SELECT win, target_id, region_id, jsonb_object_agg(k, n) AS outcomes
          FROM (SELECT s.win, s.target_id, s.region_id, e.key AS k, sum(s.sign * e.value::bigint) AS n
                  FROM s CROSS JOIN LATERAL jsonb_each_text(s.outcomes) AS e
                 GROUP BY 1, 2, 3, 4 HAVING sum(s.sign * e.value::bigint) <> 0) AS o
         GROUP BY 1, 2, 3
    ), hist AS (
        SELECT win, target_id, region_id,
               array_agg(b ORDER BY b) AS buckets, array_agg(c ORDER BY b) AS cum
          FROM (SELECT win, target_id, region_id, b, n,
                       sum(n) OVER (PARTITION BY win, target_id, region_id ORDER BY b)::int8 AS c
                  FROM (SELECT s.win, s.target_id, s.region_id, e.bucket AS b,
                               sum(s.sign * e.n)::int8 AS n
                          FROM s CROSS JOIN LATERAL vantage_hist_entries(s.total_hist) AS e
                         GROUP BY 1, 2, 3, 4 HAVING sum(s.sign * e.n) <> 0) AS e) AS x
         GROUP BY 1, 2, 3
    )
    SELECT c.win, c.target_id, c.region_id, c.probes, c.up, coalesce(m.outcomes, '{}'),
           coalesce(h.buckets, '{}'), coalesce(h.cum, '{}')
      FROM counts AS c
      LEFT JOIN mix AS m USING (win, target_id, region_id)
      LEFT JOIN hist AS h USING (win, target_id, region_id)
    $q$, source);

CREATE FUNCTION vantage_window_upsert_sql() RETURNS text
    LANGUAGE sql IMMUTABLE
    RETURN 'ON CONFLICT (win, target_id, region_id) DO UPDATE SET
                probes = excluded.probes, up = excluded.up, outcomes = excluded.outcomes,
                buckets = excluded.buckets, cum = excluded.cum';

-- Any write to the rollup tables but the round's: the kept windows can no longer be trusted.
CREATE FUNCTION vantage_kept_windows_invalidate() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('vantage.rollup_round', true) IS DISTINCT FROM 'on' THEN
        UPDATE kept_window_spans SET from_ts = NULL WHERE from_ts IS NOT NULL;
        DELETE FROM kept_windows;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER rollup_1h_data_kept_windows
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON rollup_1h_data
    FOR EACH STATEMENT EXECUTE FUNCTION vantage_kept_windows_invalidate();
CREATE TRIGGER rollup_1d_data_kept_windows
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON rollup_1d_data
    FOR EACH STATEMENT EXECUTE FUNCTION vantage_kept_windows_invalidate();

-- Moves (or builds) every kept window to its start as of `as_of` (the round: now(); tests move
-- them elsewhere to check the reads' corrections); returns the windows moved or built.
CREATE FUNCTION vantage_kept_windows_move(as_of timestamptz DEFAULT now()) RETURNS bigint
    LANGUAGE plpgsql AS $$
DECLARE
    w record;
    start timestamptz;
    tbl text;
    cur_parts text[];
    moved bigint := 0;
BEGIN
    FOR w IN SELECT * FROM kept_window_spans ORDER BY win FOR UPDATE LOOP
        start := date_trunc(w.unit, as_of - w.span, 'UTC');
        tbl := CASE WHEN w.unit = 'hour' THEN 'rollup_1h_data' ELSE 'rollup_1d_data' END;
        cur_parts := ARRAY(SELECT c.relname::text FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
                        WHERE i.inhparent = to_regclass(tbl) ORDER BY 1);
        IF w.from_ts IS NULL OR start < w.from_ts OR cur_parts IS DISTINCT FROM w.parts THEN
            -- Build from the rows (a new or invalidated window, or a clock that went back).
            DELETE FROM kept_windows WHERE win = w.win;
            EXECUTE format('INSERT INTO kept_windows (win, target_id, region_id, probes, up,
                                                      outcomes, buckets, cum) %s',
                vantage_window_merge_sql(format(
                    '(SELECT 1 AS sign, %s::smallint AS win, d.target_id, d.region_id, d.probes,
                             d.up, d.outcomes, d.total_hist
                        FROM %I AS d WHERE d.bucket >= %L) AS src', w.win, tbl, start)));
        ELSIF start > w.from_ts THEN
            -- The rows left behind leave the window.
            EXECUTE format('INSERT INTO kept_windows AS x (win, target_id, region_id, probes, up,
                                                           outcomes, buckets, cum) %s %s',
                vantage_window_merge_sql(format(
                    '(SELECT 1 AS sign, k.win, k.target_id, k.region_id, k.probes, k.up,
                             k.outcomes, vantage_kept_hist(k.buckets, k.cum) AS total_hist
                        FROM kept_windows AS k
                       WHERE k.win = %1$s AND (k.target_id, k.region_id) IN (
                             SELECT d.target_id, d.region_id FROM %2$I AS d
                              WHERE d.bucket >= %3$L AND d.bucket < %4$L)
                      UNION ALL
                      SELECT -1, %1$s::smallint, d.target_id, d.region_id, d.probes, d.up,
                             d.outcomes, d.total_hist
                        FROM %2$I AS d WHERE d.bucket >= %3$L AND d.bucket < %4$L) AS src',
                    w.win, tbl, w.from_ts, start)),
                vantage_window_upsert_sql());
            DELETE FROM kept_windows WHERE win = w.win AND probes = 0;
        ELSE
            CONTINUE;
        END IF;
        UPDATE kept_window_spans AS k SET from_ts = start, parts = cur_parts WHERE k.win = w.win;
        moved := moved + 1;
    END LOOP;
    RETURN moved;
END
$$;

-- The round of 0009, and in its statement that replaces hourly rows, the kept windows' delta
-- (CTE `windows_up`); then the windows' starts move (vantage_kept_windows_move). Everything
-- else is unchanged.
CREATE OR REPLACE FUNCTION vantage_rollup_round(grace interval DEFAULT interval '2 minutes')
    RETURNS TABLE (skipped boolean, consumed bigint, hours bigint, late_hours bigint,
                   days bigint, latest bigint, hour_through timestamptz)
    LANGUAGE plpgsql AS $$
DECLARE
    w_old timestamptz;
    w_new timestamptz;
    d_t integer[];
    d_h timestamptz[];
    l_t integer[];
    l_r text[];
    l_s timestamptz[];
    n bigint;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext(current_schema() || '.vantage_rollup_round')) THEN
        RETURN QUERY SELECT true, 0::bigint, 0::bigint, 0::bigint, 0::bigint, 0::bigint,
                            (SELECT s.hour_through FROM rollup_state AS s);
        RETURN;
    END IF;
    -- The round's own writes to the rollup tables keep the kept windows (the trigger above).
    PERFORM set_config('vantage.rollup_round', 'on', true);
    SELECT s.hour_through INTO w_old FROM rollup_state AS s;
    w_new := greatest(w_old, date_trunc('hour', now() - grace, 'UTC'));
    skipped := false;

    -- 1. What was written since the last round. Buckets at or above the old watermark need
    --    nothing: they are read raw until step 2 of a round materialises them.
    WITH d AS MATERIALIZED (DELETE FROM rollup_pending RETURNING *),
    b AS (SELECT DISTINCT x.t, x.h FROM d, unnest(d.targets, d.hours) AS x(t, h) WHERE x.h < w_old),
    l AS (SELECT y.t, y.r, max(y.s) AS s FROM d, unnest(d.l_targets, d.l_regions, d.l_started) AS y(t, r, s)
           GROUP BY 1, 2)
    SELECT (SELECT count(*) FROM d),
           (SELECT array_agg(b.t ORDER BY b.t, b.h) FROM b), (SELECT array_agg(b.h ORDER BY b.t, b.h) FROM b),
           (SELECT array_agg(l.t) FROM l), (SELECT array_agg(l.r) FROM l), (SELECT array_agg(l.s) FROM l)
      INTO consumed, d_t, d_h, l_t, l_r, l_s;
    d_t := coalesce(d_t, '{}');
    d_h := coalesce(d_h, '{}');
    -- A backfill (late data for more hours than the kept windows have rows) costs less rebuilt
    -- (step 3) than merged into them bucket by bucket.
    IF cardinality(d_t) > (SELECT count(*) FROM kept_windows) THEN
        UPDATE kept_window_spans SET from_ts = NULL WHERE from_ts IS NOT NULL;
        DELETE FROM kept_windows;
    END IF;

    -- 2. As 0009 (see there), plus `windows_up`: every built kept window that covers a replaced
    --    hour (hour windows: the hour; day windows: its day) gets new - old of it.
    PERFORM set_config('jit', 'off', true);
    EXECUTE format($q$
        WITH new AS MATERIALIZED (%1$s),
        old AS MATERIALIZED (
            SELECT -1 AS sign, h.* FROM rollup_1h_data AS h
              JOIN new AS n ON n.target_id = h.target_id AND n.bucket = h.bucket AND n.region_id = h.region_id
             WHERE h.bucket < $1),
        hours_up AS (
            INSERT INTO rollup_1h_data AS x (target_id, region_id, bucket, probes, up, outcomes,
                                             total_hist, dns_hist, connect_hist, tls_hist,
                                             ttfb_hist, transfer_hist)
            SELECT * FROM new %2$s
            RETURNING x.bucket),
        day_keys AS (SELECT DISTINCT target_id, region_id, date_trunc('day', bucket, 'UTC') AS d FROM new),
        src AS (
            SELECT 1 AS sign, d.bucket, d.target_id, d.probes, d.up, d.region_id, d.outcomes,
                   d.total_hist, d.dns_hist, d.connect_hist, d.tls_hist, d.ttfb_hist, d.transfer_hist
              FROM rollup_1d_data AS d
              JOIN day_keys AS k ON k.target_id = d.target_id AND k.region_id = d.region_id AND k.d = d.bucket
            UNION ALL
            SELECT 1, n.bucket, n.target_id, n.probes, n.up, n.region_id, n.outcomes, n.total_hist,
                   n.dns_hist, n.connect_hist, n.tls_hist, n.ttfb_hist, n.transfer_hist FROM new AS n
            UNION ALL
            SELECT o.sign, o.bucket, o.target_id, o.probes, o.up, o.region_id, o.outcomes,
                   o.total_hist, o.dns_hist, o.connect_hist, o.tls_hist, o.ttfb_hist, o.transfer_hist
              FROM old AS o),
        days_up AS (
            INSERT INTO rollup_1d_data AS x (target_id, region_id, bucket, probes, up, outcomes,
                                             total_hist, dns_hist, connect_hist, tls_hist,
                                             ttfb_hist, transfer_hist)
            %3$s %2$s
            RETURNING 1),
        delta AS MATERIALIZED (
            SELECT w.win, c.sign, c.target_id, c.region_id, c.probes, c.up, c.outcomes, c.total_hist
              FROM (SELECT 1 AS sign, n.bucket, n.target_id, n.region_id, n.probes, n.up,
                           n.outcomes, n.total_hist FROM new AS n
                    UNION ALL
                    SELECT o.sign, o.bucket, o.target_id, o.region_id, o.probes, o.up,
                           o.outcomes, o.total_hist FROM old AS o) AS c
              JOIN kept_window_spans AS w
                ON w.from_ts IS NOT NULL AND date_trunc(w.unit, c.bucket, 'UTC') >= w.from_ts),
        windows_up AS (
            INSERT INTO kept_windows AS x (win, target_id, region_id, probes, up, outcomes,
                                           buckets, cum)
            %4$s %5$s
            RETURNING 1)
        SELECT (SELECT count(*) FILTER (WHERE bucket >= $1) FROM hours_up),
               (SELECT count(*) FILTER (WHERE bucket < $1) FROM hours_up),
               (SELECT count(*) FROM days_up),
               (SELECT count(*) FROM windows_up)
        $q$,
        vantage_agg_sql('hour',
            '(SELECT r.* FROM results_raw AS r WHERE r.started_at >= $1 AND r.started_at < $2
              UNION ALL
              SELECT r.* FROM unnest($3::integer[], $4::timestamptz[]) AS k(t, h)
                JOIN results_raw AS r ON r.target_id = k.t AND r.started_at >= k.h
                                     AND r.started_at < k.h + interval ''1 hour'') AS r'),
        vantage_upsert_sql(),
        vantage_merge_sql('day', 'src'),
        vantage_window_merge_sql(
            '(SELECT 1 AS sign, k.win, k.target_id, k.region_id, k.probes, k.up, k.outcomes,
                     vantage_kept_hist(k.buckets, k.cum) AS total_hist
                FROM kept_windows AS k
               WHERE (k.win, k.target_id, k.region_id) IN (SELECT win, target_id, region_id FROM delta)
              UNION ALL
              SELECT sign, win, target_id, region_id, probes, up, outcomes, total_hist
                FROM delta) AS src'),
        vantage_window_upsert_sql())
        USING w_old, w_new, d_t, d_h
        INTO hours, late_hours, days, n;
    DELETE FROM kept_windows WHERE probes = 0;
    -- 3. The kept windows' starts (an hour or a day passed), or their first build.
    PERFORM vantage_kept_windows_move();

    -- 4. Latest result per target and region.
    latest := 0;
    IF cardinality(l_t) > 0 THEN
        INSERT INTO latest_results AS l (target_id, region, agent, started_at, status, outcome,
                                         failed_phase, total_us, cert_not_after)
        SELECT DISTINCT ON (c.t, c.r) r.target_id, c.r, a.agent, r.started_at, r.status,
               o.outcome, p.phase, r.total_us, r.cert_not_after
          FROM unnest(l_t, l_r, l_s) AS c(t, r, s)
          JOIN regions AS g ON g.region = c.r
          JOIN results_raw AS r ON r.target_id = c.t AND r.started_at = c.s AND r.region_id = g.region_id
          JOIN agents AS a ON a.agent_id = r.agent_id
          JOIN outcomes AS o ON o.outcome_id = r.outcome_id
          LEFT JOIN phases AS p ON p.phase_id = r.failed_phase_id
         ORDER BY c.t, c.r, a.agent
        ON CONFLICT (target_id, region) DO UPDATE SET
            agent = excluded.agent, started_at = excluded.started_at, status = excluded.status,
            outcome = excluded.outcome, failed_phase = excluded.failed_phase,
            total_us = excluded.total_us, cert_not_after = excluded.cert_not_after
         WHERE l.started_at < excluded.started_at;
        GET DIAGNOSTICS latest = ROW_COUNT;
    END IF;

    UPDATE rollup_state AS s SET hour_through = w_new, rounds = s.rounds + 1, last_round = now();
    hour_through := w_new;
    PERFORM set_config('vantage.rollup_round', 'off', true);
    RETURN NEXT;
END
$$;

-- (a) Region comparison, same signature, windows and answers as 0009's. With a kept window of
-- span = since: the kept rows (`kept`), corrected by the rows between the window's start now and
-- the kept start (`corr`, signed) and the raw rows above the watermark (`raw`); the percentiles
-- by the interval search above (`steps`, `kept_q`). Otherwise as 0009 (`rolled`, `entries`,
-- `running`, `q`). Both paths are one statement; the planner drops the branches of the other
-- level (constant `since`), and the kept-window test is a one-time filter.
CREATE OR REPLACE FUNCTION region_comparison(since interval, target integer DEFAULT NULL)
    RETURNS TABLE (target_id integer, region text, probes bigint, availability_pct float8,
                   p50_ms float8, p90_ms float8, p95_ms float8, p99_ms float8, top_error text)
    LANGUAGE sql STABLE AS $$
    WITH kw AS MATERIALIZED (
        SELECT s.win, s.from_ts,
               CASE WHEN since >= interval '3 days' THEN date_trunc('day', now() - since, 'UTC')
                    ELSE date_trunc('hour', now() - since, 'UTC') END AS start
          FROM kept_window_spans AS s
         WHERE since >= interval '6 hours' AND s.span = since AND s.from_ts IS NOT NULL
           AND s.unit = CASE WHEN since >= interval '3 days' THEN 'day' ELSE 'hour' END
    ), rolled AS MATERIALIZED (
        SELECT h.target_id, h.region_id, h.probes, h.up, h.outcomes, h.total_hist
          FROM rollup_1h_data AS h
         WHERE since >= interval '6 hours' AND since < interval '3 days'
           AND NOT EXISTS (SELECT 1 FROM kw)
           AND h.bucket >= date_trunc('hour', now() - since, 'UTC')
           AND h.bucket < vantage_hour_through()
           AND (target IS NULL OR h.target_id = target)
        UNION ALL
        SELECT d.target_id, d.region_id, d.probes, d.up, d.outcomes, d.total_hist
          FROM rollup_1d_data AS d
         WHERE since >= interval '3 days'
           AND NOT EXISTS (SELECT 1 FROM kw)
           AND d.bucket >= date_trunc('day', now() - since, 'UTC')
           AND (target IS NULL OR d.target_id = target)
    ), kept AS MATERIALIZED (
        -- '{}' || array: the arrays detoasted once here, not at every binary search below.
        SELECT k.target_id, k.region_id, k.probes, k.up, k.outcomes,
               '{}'::integer[] || k.buckets AS buckets, '{}'::int8[] || k.cum AS cum
          FROM kw JOIN kept_windows AS k ON k.win = kw.win
         WHERE (target IS NULL OR k.target_id = target)
    ), corr AS MATERIALIZED (
        -- Rows of [start, from_ts) are missing from the kept window, rows of [from_ts, start)
        -- are too many. (The bounds as subqueries: run-time parameters, which the planner
        -- estimates as a narrow range, as they are.)
        SELECT CASE WHEN h.bucket < (SELECT from_ts FROM kw) THEN 1 ELSE -1 END AS sign,
               h.target_id, h.region_id, h.probes, h.up, h.outcomes, h.total_hist
          FROM rollup_1h_data AS h
         WHERE since >= interval '6 hours' AND since < interval '3 days'
           AND h.bucket >= (SELECT least(start, from_ts) FROM kw)
           AND h.bucket < (SELECT greatest(start, from_ts) FROM kw)
           AND (target IS NULL OR h.target_id = target)
        UNION ALL
        SELECT CASE WHEN d.bucket < (SELECT from_ts FROM kw) THEN 1 ELSE -1 END, d.target_id,
               d.region_id, d.probes, d.up, d.outcomes, d.total_hist
          FROM rollup_1d_data AS d
         WHERE since >= interval '3 days'
           AND d.bucket >= (SELECT least(start, from_ts) FROM kw)
           AND d.bucket < (SELECT greatest(start, from_ts) FROM kw)
           AND (target IS NULL OR d.target_id = target)
    ), raw AS MATERIALIZED (
        SELECT r.target_id, r.region_id, r.outcome_id, vantage_hist_bucket(r.total_us) AS b,
               count(*) AS n
          FROM results_raw AS r
         WHERE r.started_at >= CASE WHEN since < interval '6 hours'
                                    THEN date_trunc('minute', now() - since)
                                    ELSE greatest(vantage_hour_through(),
                                                  CASE WHEN since < interval '3 days'
                                                       THEN date_trunc('hour', now() - since, 'UTC')
                                                       ELSE date_trunc('day', now() - since, 'UTC') END) END
           AND (target IS NULL OR r.target_id = target)
         GROUP BY 1, 2, 3, 4
    ), totals AS (
        SELECT t.target_id, t.region_id, sum(t.probes) AS probes, sum(t.up) AS up
          FROM (SELECT target_id, region_id, probes, up FROM rolled
                UNION ALL
                SELECT target_id, region_id, probes, up FROM kept
                UNION ALL
                SELECT target_id, region_id, sign * probes, sign * up FROM corr
                UNION ALL
                SELECT target_id, region_id, n, CASE WHEN outcome_id = 1 THEN n ELSE 0 END FROM raw) AS t
         GROUP BY 1, 2
        HAVING sum(t.probes) > 0
    ), top_error AS (
        SELECT DISTINCT ON (target_id, region_id) target_id, region_id, k AS outcome
          FROM (SELECT target_id, region_id, k, sum(n) AS n
                  FROM (SELECT target_id, region_id, e.k, e.n
                          FROM rolled CROSS JOIN LATERAL vantage_count_entries(outcomes) AS e
                         WHERE rolled.up < rolled.probes   -- rows with an error only
                        UNION ALL
                        -- (jsonb_each_text: a kept window or two per series, so its row
                        -- estimate does not inflate the plan as it would for rollup rows)
                        SELECT target_id, region_id, e.key, e.value::bigint
                          FROM kept CROSS JOIN LATERAL jsonb_each_text(outcomes) AS e
                         WHERE kept.up < kept.probes
                        UNION ALL
                        SELECT target_id, region_id, e.key, corr.sign * e.value::bigint
                          FROM corr CROSS JOIN LATERAL jsonb_each_text(outcomes) AS e
                         WHERE corr.up < corr.probes
                        UNION ALL
                        SELECT raw.target_id, raw.region_id, o.outcome, raw.n
                          FROM raw JOIN outcomes AS o USING (outcome_id)) AS x
                 WHERE k <> 'up' GROUP BY 1, 2, 3 HAVING sum(n) > 0) AS o
         ORDER BY target_id, region_id, n DESC, k
    ), entries AS (
        SELECT target_id, region_id, b, sum(n) AS n
          FROM (SELECT target_id, region_id, e.bucket AS b, e.n
                  FROM rolled CROSS JOIN LATERAL vantage_hist_entries(total_hist) AS e
                UNION ALL
                SELECT target_id, region_id, b, n FROM raw WHERE NOT EXISTS (SELECT 1 FROM kw)) AS x
         GROUP BY 1, 2, 3
    ), running AS (
        SELECT target_id, region_id, b,
               sum(n) OVER (PARTITION BY target_id, region_id ORDER BY b) AS running,
               sum(n) OVER (PARTITION BY target_id, region_id) AS total
          FROM entries
    ), q AS (
        SELECT target_id, region_id,
               min(b) FILTER (WHERE running >= greatest(ceil(0.50 * total), 1)) AS p50,
               min(b) FILTER (WHERE running >= greatest(ceil(0.90 * total), 1)) AS p90,
               min(b) FILTER (WHERE running >= greatest(ceil(0.95 * total), 1)) AS p95,
               min(b) FILTER (WHERE running >= greatest(ceil(0.99 * total), 1)) AS p99
          FROM running GROUP BY 1, 2
    ), small AS (
        -- The part of the window that is not in the kept histogram, per series and bucket.
        SELECT target_id, region_id, b, sum(n) AS n
          FROM (SELECT corr.target_id, corr.region_id, e.bucket AS b, corr.sign * e.n AS n
                  FROM corr CROSS JOIN LATERAL vantage_hist_entries(corr.total_hist) AS e
                UNION ALL
                SELECT target_id, region_id, b, n FROM raw WHERE EXISTS (SELECT 1 FROM kw)) AS x
         GROUP BY 1, 2, 3
        HAVING sum(n) <> 0
    ), sizes AS (
        SELECT target_id, region_id, sum(n)::int8 AS total
          FROM (SELECT target_id, region_id, cum[cardinality(cum)] AS n FROM kept
                UNION ALL
                SELECT target_id, region_id, n FROM small) AS x
         GROUP BY 1, 2
    ), steps AS (
        -- Per series, the small part's buckets t_j in order (ts), its running sum ct_j there
        -- (cts), and the merged cumulative count F(t_j) = F_kept(t_j) + ct_j (fs, ascending).
        SELECT target_id, region_id, array_agg(b ORDER BY b) AS ts, array_agg(ct ORDER BY b) AS cts,
               array_agg(f ORDER BY b) AS fs
          FROM (SELECT sm.target_id, sm.region_id, sm.b, sm.ct::int8 AS ct,
                       sm.ct + coalesce(k.cum[width_bucket(sm.b, k.buckets)], 0) AS f
                  FROM (SELECT target_id, region_id, b,
                               sum(n) OVER (PARTITION BY target_id, region_id ORDER BY b)::int8 AS ct
                          FROM small) AS sm
                  LEFT JOIN kept AS k USING (target_id, region_id)) AS x
         GROUP BY 1, 2
    ), pos AS MATERIALIZED (
        -- Per series and percentile of rank r: j = how many t_j have F(t_j) < r, so the bucket
        -- sought is in [t_j, t_(j+1)) (t_0 = -infinity), where the kept histogram must reach
        -- r - ct_j (need).
        SELECT x.target_id, x.region_id, x.q, x.r - coalesce(x.cts[x.j], 0) AS need,
               x.ts[x.j + 1] AS next_t
          FROM (SELECT s.target_id, s.region_id, v.q, r.r, st.ts, st.cts,
                       coalesce(width_bucket(r.r - 1, st.fs), 0) AS j
                  FROM sizes AS s
                  LEFT JOIN steps AS st USING (target_id, region_id)
                 CROSS JOIN (VALUES (0.50), (0.90), (0.95), (0.99)) AS v(q)
                 CROSS JOIN LATERAL (SELECT greatest(ceil(v.q * s.total), 1)::int8 AS r) AS r
                 OFFSET 0) AS x
    ), kept_q AS (
        -- The first kept bucket where the kept cumulative count reaches need (a binary search,
        -- in C), if it comes before t_(j+1); else t_(j+1).
        SELECT target_id, region_id,
               min(b) FILTER (WHERE q = 0.50) AS p50, min(b) FILTER (WHERE q = 0.90) AS p90,
               min(b) FILTER (WHERE q = 0.95) AS p95, min(b) FILTER (WHERE q = 0.99) AS p99
          FROM (SELECT target_id, region_id, q,
                       CASE WHEN kb IS NOT NULL AND (next_t IS NULL OR kb < next_t) THEN kb
                            ELSE next_t END AS b
                  FROM (SELECT p.target_id, p.region_id, p.q, p.next_t,
                               k.buckets[width_bucket(p.need - 1, k.cum) + 1] AS kb
                          FROM pos AS p
                          LEFT JOIN kept AS k USING (target_id, region_id) OFFSET 0) AS c) AS c
         GROUP BY 1, 2
    ), pct AS (
        SELECT * FROM q UNION ALL SELECT * FROM kept_q
    )
    SELECT t.target_id, g.region, t.probes::bigint, 100.0 * t.up / nullif(t.probes, 0),
           vantage_hist_value(q.p50) / 1000, vantage_hist_value(q.p90) / 1000,
           vantage_hist_value(q.p95) / 1000, vantage_hist_value(q.p99) / 1000, e.outcome
      FROM totals AS t
      JOIN regions AS g ON g.region_id = t.region_id
      LEFT JOIN pct AS q ON q.target_id = t.target_id AND q.region_id = t.region_id
      LEFT JOIN top_error AS e ON e.target_id = t.target_id AND e.region_id = t.region_id
     ORDER BY t.target_id, g.region
$$;

-- The status page's daily counts (0008's web_daily, same signature and answers). 0008 read the
-- `rollup_1d` view: a heap scan of the daily rows (wide: six histograms each), a hash
-- aggregate by region name and day, and three ordered array_agg per series, each a sort of its
-- own; over 30 days of 1,000 series that was most of the overview's time (150-290 ms of ~325,
-- measured). Here: probes and up from an index-only scan of `rollup_1d_data_series` (below),
-- today's raw rows above the watermark counted per series and added to their day (a day with no
-- materialised hour yet comes from them alone), and the arrays built by one window over one
-- sort. While a pre-0009 schema is still being moved (`rollup_1d_v8` exists) it reads the view
-- as before.
CREATE INDEX rollup_1d_data_series ON rollup_1d_data (target_id, region_id, bucket)
    INCLUDE (probes, up);

CREATE OR REPLACE FUNCTION web_daily(days integer, target integer DEFAULT NULL)
    RETURNS TABLE (target_id integer, region text, day date[], probes bigint[], up bigint[])
    LANGUAGE plpgsql STABLE AS $$
DECLARE
    start constant timestamptz := date_trunc('day', now(), 'UTC')
                                  - (least(greatest(days, 1), 400) - 1) * interval '1 day';
BEGIN
    IF to_regclass('rollup_1d_v8') IS NOT NULL THEN
        RETURN QUERY
        SELECT t.target_id, t.region, array_agg(t.day ORDER BY t.day),
               array_agg(t.probes ORDER BY t.day), array_agg(t.up ORDER BY t.day)
          FROM (SELECT d.target_id, d.region, (d.bucket AT TIME ZONE 'UTC')::date AS day,
                       sum(d.probes)::bigint AS probes, sum(d.up)::bigint AS up
                  FROM rollup_1d AS d
                 WHERE d.bucket >= start AND (target IS NULL OR d.target_id = target)
                 GROUP BY 1, 2, 3) AS t
         GROUP BY 1, 2
         ORDER BY 1, 2;
        RETURN;
    END IF;
    RETURN QUERY
    WITH raw AS MATERIALIZED (
        SELECT r.target_id, r.region_id, date_trunc('day', r.started_at, 'UTC') AS bucket,
               count(*) AS probes, count(*) FILTER (WHERE r.outcome_id = 1) AS up
          FROM results_raw AS r
         WHERE r.started_at >= greatest(vantage_hour_through(), start)
           AND (target IS NULL OR r.target_id = target)
         GROUP BY 1, 2, 3
    ), c AS (
        SELECT d.target_id, d.region_id, d.bucket, d.probes + coalesce(x.probes, 0) AS probes,
               d.up + coalesce(x.up, 0) AS up
          FROM rollup_1d_data AS d
          LEFT JOIN raw AS x USING (target_id, region_id, bucket)
         WHERE d.bucket >= start AND (target IS NULL OR d.target_id = target)
        UNION ALL
        SELECT x.target_id, x.region_id, x.bucket, x.probes, x.up
          FROM raw AS x
         WHERE NOT EXISTS (SELECT 1 FROM rollup_1d_data AS d
                            WHERE d.target_id = x.target_id AND d.region_id = x.region_id
                              AND d.bucket = x.bucket)
    )
    SELECT w.target_id, g.region, w.day, w.probes, w.up
      FROM (SELECT c.target_id, c.region_id,
                   array_agg((c.bucket AT TIME ZONE 'UTC')::date) OVER s AS day,
                   array_agg(c.probes) OVER s AS probes, array_agg(c.up) OVER s AS up,
                   row_number() OVER s AS i, count(*) OVER s AS n
              FROM c
            WINDOW s AS (PARTITION BY c.target_id, c.region_id ORDER BY c.bucket
                         ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)) AS w
      JOIN regions AS g ON g.region_id = w.region_id
     WHERE w.i = w.n   -- the last row of each series carries its arrays
     ORDER BY 1, 2;
END
$$;
