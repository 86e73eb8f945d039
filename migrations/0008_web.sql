-- 0008 (issue #17): what the dashboard (`vantage-ingester web`, docs/web.md) reads that the SQL
-- interface did not have yet: latency per bucket and region for a chart, phase medians and the
-- outcome mix per region over a window, and daily counts for the status page's bars and its 7-
-- and 30-day availability.
--
-- These functions read only the documented interface (docs/sql.md): `results`, `rollup_1h` and
-- `rollup_1d` by their column names (the same names whether they are tables, as here, or views
-- over compacted storage), never a partition, an index or a rollup detail such as partial rows
-- (every read aggregates by bucket, as docs/sql.md asks). Windows up to 6 hours read raw rows
-- (one target, a few partitions); longer windows read hourly rollups up to 7 days and daily
-- rollups beyond, so no window over a day scans raw rows. Every function is bounded: one target
-- or a fixed window of at most 400 days, and callers add LIMITs.

-- Which level serves a window: 'raw' (up to 6 hours), '1h' (up to 7 days), '1d' (beyond).
CREATE FUNCTION web_resolution(since interval) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN since <= interval '6 hours' THEN 'raw'
                WHEN since <= interval '7 days' THEN '1h'
                ELSE '1d' END;

-- Latency of one target per bucket and region over the window: probes, up, p50 and p95 of the
-- total time in ms. Buckets: 1 minute up to 1 hour, 5 minutes up to 6 hours (raw rows,
-- exact nearest-rank percentiles), hours up to 7 days, UTC days beyond (rollup histograms,
-- within 1%). The first bucket is the one that contains now() - since.
CREATE FUNCTION web_latency(target integer, since interval)
    RETURNS TABLE (bucket timestamptz, region text, probes bigint, up bigint, p50_ms float8,
                   p95_ms float8)
    LANGUAGE plpgsql STABLE AS $$
DECLARE
    step interval := CASE WHEN since <= interval '1 hour' THEN interval '1 minute'
                          ELSE interval '5 minutes' END;
BEGIN
    IF web_resolution(since) = 'raw' THEN
        RETURN QUERY
        SELECT date_bin(step, r.started_at, timestamptz '2000-01-01 00:00:00+00'), r.region,
               count(*), count(*) FILTER (WHERE r.outcome = 'up'),
               (percentile_disc(0.5) WITHIN GROUP (ORDER BY r.total_us))::float8 / 1000,
               (percentile_disc(0.95) WITHIN GROUP (ORDER BY r.total_us))::float8 / 1000
          FROM results AS r
         WHERE r.target_id = target
           AND r.started_at >= date_bin(step, now() - since, timestamptz '2000-01-01 00:00:00+00')
         GROUP BY 1, 2 ORDER BY 1, 2;
    ELSE
        -- Percentiles from the histograms' entries with plain GROUP BY and running sums (as
        -- region_comparison does): merging arrays with vantage_hist_merge_agg costs far more.
        RETURN QUERY
        WITH rows AS MATERIALIZED (
            SELECT h.bucket, h.region, h.probes, h.up, h.total_hist
              FROM rollup_1h AS h
             WHERE web_resolution(since) = '1h' AND h.target_id = target
               AND h.bucket >= date_trunc('hour', now() - since, 'UTC')
            UNION ALL
            SELECT d.bucket, d.region, d.probes, d.up, d.total_hist
              FROM rollup_1d AS d
             WHERE web_resolution(since) = '1d' AND d.target_id = target
               AND d.bucket >= date_trunc('day', now() - least(since, interval '400 days'), 'UTC')
        ), totals AS (
            SELECT r.bucket, r.region, sum(r.probes)::bigint AS probes, sum(r.up)::bigint AS up
              FROM rows AS r GROUP BY 1, 2
        ), entries AS (
            SELECT r.bucket, r.region, e.bucket AS b, sum(e.n) AS n
              FROM rows AS r CROSS JOIN LATERAL vantage_hist_entries(r.total_hist) AS e
             GROUP BY 1, 2, 3
        ), running AS (
            SELECT e.bucket, e.region, e.b,
                   sum(e.n) OVER (PARTITION BY e.bucket, e.region ORDER BY e.b) AS running,
                   sum(e.n) OVER (PARTITION BY e.bucket, e.region) AS total
              FROM entries AS e
        ), q AS (
            SELECT r.bucket, r.region,
                   min(r.b) FILTER (WHERE r.running >= greatest(ceil(0.50 * r.total), 1)) AS p50,
                   min(r.b) FILTER (WHERE r.running >= greatest(ceil(0.95 * r.total), 1)) AS p95
              FROM running AS r GROUP BY 1, 2
        )
        SELECT t.bucket, t.region, t.probes, t.up, vantage_hist_value(q.p50) / 1000,
               vantage_hist_value(q.p95) / 1000
          FROM totals AS t LEFT JOIN q ON q.bucket = t.bucket AND q.region = t.region
         ORDER BY 1, 2;
    END IF;
END
$$;

-- One target per region over the window: probes, up, the outcome counts ({"up": 55, ...}) and
-- the median of each phase in ms ("why is it slow from there"). Same levels and window starts
-- as web_latency (raw rows start at the minute).
CREATE FUNCTION web_region_detail(target integer, since interval)
    RETURNS TABLE (region text, probes bigint, up bigint, outcomes jsonb, dns_ms float8,
                   connect_ms float8, tls_ms float8, ttfb_ms float8, transfer_ms float8)
    LANGUAGE plpgsql STABLE AS $$
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
        ), entries AS (
            SELECT r.region, p.phase, e.bucket AS b, sum(e.n) AS n
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
                   min(r.b) FILTER (WHERE r.running >= greatest(ceil(0.5 * r.total), 1)) AS p50
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

-- Daily counts of each target from each region over the last `days` UTC days (today
-- included; at most 400), as aligned arrays per target and region: the day, its probes, how many
-- were up. One read of the daily rollups gives the status page its 90 uptime bars and its 7- and
-- 30-day availability (the sums from the day that contains now() - 7 or 30 days, as
-- region_comparison's windows of 3 days and more start). Days without a probe are absent.
-- target NULL: every target.
CREATE FUNCTION web_daily(days integer, target integer DEFAULT NULL)
    RETURNS TABLE (target_id integer, region text, day date[], probes bigint[], up bigint[])
    LANGUAGE sql STABLE AS $$
    SELECT t.target_id, t.region, array_agg(t.day ORDER BY t.day),
           array_agg(t.probes ORDER BY t.day), array_agg(t.up ORDER BY t.day)
      FROM (SELECT d.target_id, d.region, (d.bucket AT TIME ZONE 'UTC')::date AS day,
                   sum(d.probes)::bigint AS probes, sum(d.up)::bigint AS up
              FROM rollup_1d AS d
             WHERE d.bucket >= date_trunc('day', now(), 'UTC')
                              - (least(greatest(days, 1), 400) - 1) * interval '1 day'
               AND (target IS NULL OR d.target_id = target)
             GROUP BY 1, 2, 3) AS t
     GROUP BY 1, 2
     ORDER BY 1, 2
$$;
