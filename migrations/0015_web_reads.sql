-- 0015 (issue #17): the dashboard's region detail (target page) over 7 and 30 days in a third
-- of the time.
--
-- Why: bench-web (10 million results, 200 targets x 5 regions, 31 days) served the target page
-- at 30 days in 138 ms p50 (goal <= 100). Of that, web_region_detail took 87 ms for one target,
-- although it reads only 160 daily rollup rows. EXPLAIN ANALYZE showed where: the 79,000
-- histogram entries (5 phases x 160 rows x ~99) were sorted to feed a GroupAggregate and the
-- window sums after it, a sort that spilled to disk at the default work_mem (4 MB), and every
-- array was unnested behind a Memoize node keyed by the array itself.
--
-- What changes (the answers do not: tests/storage.rs region_comparison_answers_as_0009_did
-- compares the function with 0008's, EXCEPT ALL both ways):
--   * the merged entries are a MATERIALIZED CTE, so PostgreSQL merges them with a HashAggregate
--     (2,800 groups) and sorts only those for the running sums;
--   * the function runs with enable_memoize = off (the cache of unnest results per array costs
--     more than it saves: no two rows carry the same histogram);
--   * counts are summed as float8, not numeric (sum(int8) is numeric in PostgreSQL, and slow):
--     exact, since every count and sum of counts is an integer far below 2^53; the ranks are
--     still computed in numeric (0.5 * total, as before), so the same bucket is picked.
-- One target, bench_web's schema, psql, 5 calls: 30 days 83-141 -> 29-33 ms, 7 days 61-96 ->
-- 24-37 ms. web_latency is left as 0008 wrote it: the same changes made it slower there (one
-- histogram per bucket: 16,000 entries in 155 groups stream through the sort well).
-- The raw-row branch (windows up to 6 hours) is unchanged.

-- One target per region over the window: probes, up, the outcome counts ({"up": 55, ...}) and
-- the median of each phase in ms ("why is it slow from there"). Same levels and window starts
-- as web_latency (raw rows start at the minute).
CREATE OR REPLACE FUNCTION web_region_detail(target integer, since interval)
    RETURNS TABLE (region text, probes bigint, up bigint, outcomes jsonb, dns_ms float8,
                   connect_ms float8, tls_ms float8, ttfb_ms float8, transfer_ms float8)
    LANGUAGE plpgsql STABLE
    SET enable_memoize = off AS $$
BEGIN
    IF web_resolution(since) = 'raw' THEN
        RETURN QUERY
        SELECT r.region, count(*), count(*) FILTER (WHERE r.outcome = 'up'),
               vantage_count_agg(r.outcome),
               (percentile_disc(0.5) WITHIN GROUP (ORDER BY r.dns_us))::float8 / 1000,
               (percentile_disc(0.5) WITHIN GROUP (ORDER BY r.connect_us))::float8 / 1000,
               (percentile_disc(0.5) WITHIN GROUP (ORDER BY r.tls_us))::float8 / 1000,
               (percentile_disc(0.5) WITHIN GROUP (ORDER BY r.ttfb_us))::float8 / 1000,
               (percentile_disc(0.5) WITHIN GROUP (ORDER BY r.transfer_us))::float8 / 1000
          FROM results AS r
         WHERE r.target_id = target AND r.started_at >= date_trunc('minute', now() - since)
         GROUP BY 1 ORDER BY 1;
    ELSE
        RETURN QUERY
        WITH rows AS MATERIALIZED (
            SELECT h.region, h.probes, h.up, h.outcomes, h.dns_hist, h.connect_hist, h.tls_hist,
                   h.ttfb_hist, h.transfer_hist
              FROM rollup_1h AS h
             WHERE web_resolution(since) = '1h' AND h.target_id = target
               AND h.bucket >= date_trunc('hour', now() - since, 'UTC')
            UNION ALL
            SELECT d.region, d.probes, d.up, d.outcomes, d.dns_hist, d.connect_hist, d.tls_hist,
                   d.ttfb_hist, d.transfer_hist
              FROM rollup_1d AS d
             WHERE web_resolution(since) = '1d' AND d.target_id = target
               AND d.bucket >= date_trunc('day', now() - least(since, interval '400 days'), 'UTC')
        ), totals AS (
            SELECT r.region, sum(r.probes)::bigint AS probes, sum(r.up)::bigint AS up
              FROM rows AS r GROUP BY 1
        ), mix AS (
            SELECT o.region, jsonb_object_agg(o.k, o.n) AS outcomes
              FROM (SELECT r.region, e.k, sum(e.n)::bigint AS n
                      FROM rows AS r CROSS JOIN LATERAL vantage_count_entries(r.outcomes) AS e
                     GROUP BY 1, 2) AS o
             GROUP BY 1
        ), entries AS MATERIALIZED (
            SELECT r.region, p.phase, e.bucket AS b, sum(e.n::float8) AS n
              FROM rows AS r
             CROSS JOIN LATERAL (VALUES (1, r.dns_hist), (2, r.connect_hist), (3, r.tls_hist),
                                        (4, r.ttfb_hist), (5, r.transfer_hist)) AS p(phase, h)
             CROSS JOIN LATERAL vantage_hist_entries(p.h) AS e
             GROUP BY 1, 2, 3
        ), running AS (
            SELECT e.region, e.phase, e.b,
                   sum(e.n) OVER (PARTITION BY e.region, e.phase ORDER BY e.b) AS running,
                   sum(e.n) OVER (PARTITION BY e.region, e.phase) AS total
              FROM entries AS e
        ), q AS (
            SELECT r.region, r.phase,
                   min(r.b) FILTER (WHERE r.running >= greatest(ceil(0.5 * r.total::numeric), 1)) AS p50
              FROM running AS r GROUP BY 1, 2
        )
        SELECT t.region, t.probes, t.up, coalesce(m.outcomes, '{}'::jsonb),
               vantage_hist_value(max(q.p50) FILTER (WHERE q.phase = 1)) / 1000,
               vantage_hist_value(max(q.p50) FILTER (WHERE q.phase = 2)) / 1000,
               vantage_hist_value(max(q.p50) FILTER (WHERE q.phase = 3)) / 1000,
               vantage_hist_value(max(q.p50) FILTER (WHERE q.phase = 4)) / 1000,
               vantage_hist_value(max(q.p50) FILTER (WHERE q.phase = 5)) / 1000
          FROM totals AS t
          LEFT JOIN mix AS m ON m.region = t.region
          LEFT JOIN q ON q.region = t.region
         GROUP BY t.region, t.probes, t.up, m.outcomes
         ORDER BY 1;
    END IF;
END
$$;
