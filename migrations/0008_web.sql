-- 0008 (issue #17): what the dashboard (`vantage-ingester web`, docs/web.md) reads that the SQL
-- interface did not have yet: latency per bucket and region for a chart, phase medians and the
-- outcome mix per region over a window, availability without percentiles, and daily uptime for
-- the status page's bars.
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
    ELSIF web_resolution(since) = '1h' THEN
        RETURN QUERY
        SELECT r.bucket, r.region, sum(r.probes)::bigint, sum(r.up)::bigint,
               vantage_hist_quantile(vantage_hist_merge_agg(r.total_hist), 0.5) / 1000,
               vantage_hist_quantile(vantage_hist_merge_agg(r.total_hist), 0.95) / 1000
          FROM rollup_1h AS r
         WHERE r.target_id = target AND r.bucket >= date_trunc('hour', now() - since, 'UTC')
         GROUP BY 1, 2 ORDER BY 1, 2;
    ELSE
        RETURN QUERY
        SELECT r.bucket, r.region, sum(r.probes)::bigint, sum(r.up)::bigint,
               vantage_hist_quantile(vantage_hist_merge_agg(r.total_hist), 0.5) / 1000,
               vantage_hist_quantile(vantage_hist_merge_agg(r.total_hist), 0.95) / 1000
          FROM rollup_1d AS r
         WHERE r.target_id = target
           AND r.bucket >= date_trunc('day', now() - least(since, interval '400 days'), 'UTC')
         GROUP BY 1, 2 ORDER BY 1, 2;
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
        SELECT r.region, sum(r.probes)::bigint, sum(r.up)::bigint,
               vantage_jsonb_sum_agg(r.outcomes),
               vantage_hist_quantile(vantage_hist_merge_agg(r.dns_hist), 0.5) / 1000,
               vantage_hist_quantile(vantage_hist_merge_agg(r.connect_hist), 0.5) / 1000,
               vantage_hist_quantile(vantage_hist_merge_agg(r.tls_hist), 0.5) / 1000,
               vantage_hist_quantile(vantage_hist_merge_agg(r.ttfb_hist), 0.5) / 1000,
               vantage_hist_quantile(vantage_hist_merge_agg(r.transfer_hist), 0.5) / 1000
          FROM (SELECT h.region, h.probes, h.up, h.outcomes, h.dns_hist, h.connect_hist,
                       h.tls_hist, h.ttfb_hist, h.transfer_hist
                  FROM rollup_1h AS h
                 WHERE web_resolution(since) = '1h' AND h.target_id = target
                   AND h.bucket >= date_trunc('hour', now() - since, 'UTC')
                UNION ALL
                SELECT d.region, d.probes, d.up, d.outcomes, d.dns_hist, d.connect_hist,
                       d.tls_hist, d.ttfb_hist, d.transfer_hist
                  FROM rollup_1d AS d
                 WHERE web_resolution(since) = '1d' AND d.target_id = target
                   AND d.bucket >= date_trunc('day', now() - least(since, interval '400 days'), 'UTC')
               ) AS r
         GROUP BY 1 ORDER BY 1;
    END IF;
END
$$;

-- Availability per target and region over a window of whole UTC days (the window starts at the
-- day that contains now() - since, as region_comparison's does from 3 days on): probes and up,
-- no percentiles, so the status page's 7- and 30-day columns cost a sum over daily rows.
-- target NULL: every target.
CREATE FUNCTION web_availability(since interval, target integer DEFAULT NULL)
    RETURNS TABLE (target_id integer, region text, probes bigint, up bigint)
    LANGUAGE sql STABLE AS $$
    SELECT d.target_id, d.region, sum(d.probes)::bigint, sum(d.up)::bigint
      FROM rollup_1d AS d
     WHERE d.bucket >= date_trunc('day', now() - least(since, interval '400 days'), 'UTC')
       AND (target IS NULL OR d.target_id = target)
     GROUP BY 1, 2
     ORDER BY 1, 2
$$;

-- Daily uptime of each target (every region together) over the last `days` UTC days, today
-- included, as aligned arrays per target (one row per target, not one per day): the day, its
-- probes and how many were up. Days without a probe are absent (the page shows them as "no
-- data"). target NULL: every target.
CREATE FUNCTION web_daily_uptime(days integer, target integer DEFAULT NULL)
    RETURNS TABLE (target_id integer, day date[], probes bigint[], up bigint[])
    LANGUAGE sql STABLE AS $$
    SELECT t.target_id, array_agg(t.day ORDER BY t.day), array_agg(t.probes ORDER BY t.day),
           array_agg(t.up ORDER BY t.day)
      FROM (SELECT d.target_id, (d.bucket AT TIME ZONE 'UTC')::date AS day,
                   sum(d.probes)::bigint AS probes, sum(d.up)::bigint AS up
              FROM rollup_1d AS d
             WHERE d.bucket >= date_trunc('day', now(), 'UTC')
                              - (least(greatest(days, 1), 400) - 1) * interval '1 day'
               AND (target IS NULL OR d.target_id = target)
             GROUP BY 1, 2) AS t
     GROUP BY 1
     ORDER BY 1
$$;
