-- 0013: clock health (issue #18 item 3). Every batch of a version 3 frame says how far the
-- agent's clock can be trusted (the kernel's synced flag and maximum error, the time since boot,
-- the seal time; vantage_proto::ClockHealth); the sink stores it per row and per agent.
--
-- 1. results_raw gets each row's clock state: `clock_error_ms` (the kernel's maximum error when
--    the batch was sealed) and `clock_unsynced` (true: taken before the first clock sync of the
--    agent's boot, or while the clock was not synchronised). Both NULL when unknown (frames of
--    version 1 and 2, agents not on Linux, rows from before 0013). Nullable columns at the end:
--    no table rewrite.
-- 2. The `results` view shows them (appended, so CREATE OR REPLACE keeps every reader):
--    vantage_define_views as in 0009 with the two columns added, because vantage_migrate_v8
--    calls it again when the pre-0009 move ends (it would otherwise drop them: an error). Its
--    INSERT trigger writes them. vantage_define_views has no SET clauses (0011 set
--    lock_timeout only on the upkeep functions, which this file leaves alone).
-- 3. agents gets the latest clock state of each agent, and `fleet` shows it: synced, maximum
--    error, boot age, the offset of the agent's clock from the bridge's (seal time minus the
--    bridge's receive time, the Kafka timestamp: a lower bound of how far ahead it is, exact to
--    the transit time) and the sink's verdict (`clock_flag`: 'offset' when more than 10 s ahead
--    or further behind than sink.max_clock_behind, 'unsynced' when not synchronised, NULL when
--    fine).

ALTER TABLE results_raw
    ADD COLUMN clock_error_ms integer,   -- the kernel's maximum error when sealed, ms (NULL: unknown)
    ADD COLUMN clock_unsynced boolean;   -- taken before the boot's first sync or while unsynced (NULL: unknown)

CREATE OR REPLACE FUNCTION vantage_define_views(with_v8 boolean) RETURNS void
    LANGUAGE plpgsql AS $$
DECLARE
    cols constant text := 'target_id, region, bucket, probes, up, outcomes, total_hist, dns_hist,
                           connect_hist, tls_hist, ttfb_hist, transfer_hist';
    v8_from constant timestamptz := (SELECT CASE WHEN s.hour_through = '-infinity' THEN s.hour_through
                                                  ELSE date_trunc('day', s.hour_through, 'UTC') END
                                       FROM rollup_state AS s);
BEGIN
    -- Raw results, with names for the ids (0013: and the clock state of each).
    EXECUTE format($v$
    CREATE OR REPLACE VIEW results AS
    SELECT g.region, a.agent, r.boot_id, r.seq, r.target_id, r.started_at, r.status,
           o.outcome, r.regex_match, r.total_us, r.dns_us, r.connect_us, r.tls_us, r.ttfb_us,
           r.body_bytes, r.ingested_at, p.phase AS failed_phase, r.transfer_us,
           r.body_truncated, r.redirects, r.cert_not_after, r.remote_ip, r.clock_error_ms,
           r.clock_unsynced
      FROM results_raw AS r
      JOIN regions AS g ON g.region_id = r.region_id
      JOIN agents AS a ON a.agent_id = r.agent_id
      JOIN outcomes AS o ON o.outcome_id = r.outcome_id
      LEFT JOIN phases AS p ON p.phase_id = r.failed_phase_id
    %s $v$,
        CASE WHEN with_v8 THEN
            'UNION ALL SELECT region, agent, boot_id, seq, target_id, started_at, status, outcome,
                    regex_match, total_us, dns_us, connect_us, tls_us, ttfb_us, body_bytes,
                    ingested_at, failed_phase, transfer_us, body_truncated, redirects,
                    cert_not_after, remote_ip, NULL::integer, NULL::boolean FROM results_v8'
             ELSE '' END);

    -- Minute buckets: always from raw rows (1-minute rollups did not pay for themselves).
    EXECUTE format($v$
    CREATE OR REPLACE VIEW rollup_1m AS
    SELECT x.target_id, g.region, x.bucket, x.probes, x.up, x.outcomes, x.total_hist,
           x.dns_hist, x.connect_hist, x.tls_hist, x.ttfb_hist, x.transfer_hist
      FROM (%s) AS x JOIN regions AS g ON g.region_id = x.region_id $v$,
        vantage_agg_sql('minute', 'results_raw AS r'));

    -- Hours: materialised below the watermark, raw above.
    EXECUTE format($v$
    CREATE OR REPLACE VIEW rollup_1h AS
    SELECT h.target_id, g.region, h.bucket, h.probes, h.up, h.outcomes, h.total_hist,
           h.dns_hist, h.connect_hist, h.tls_hist, h.ttfb_hist, h.transfer_hist
      FROM rollup_1h_data AS h JOIN regions AS g ON g.region_id = h.region_id
     WHERE h.bucket < vantage_hour_through()
    UNION ALL
    SELECT x.target_id, g.region, x.bucket, x.probes, x.up, x.outcomes, x.total_hist,
           x.dns_hist, x.connect_hist, x.tls_hist, x.ttfb_hist, x.transfer_hist
      FROM (%s) AS x JOIN regions AS g ON g.region_id = x.region_id
    %s $v$,
        vantage_agg_sql('hour', 'results_raw AS r', 'r.started_at >= vantage_hour_through()'),
        CASE WHEN with_v8 THEN format('UNION ALL SELECT %s FROM rollup_1h_v8 WHERE bucket < %L',
                                      cols, v8_from) ELSE '' END);

    -- Days: the materialised part of each day (its hours below the watermark), and the rest of
    -- it from raw rows. A day can have two rows here: read them summed by bucket (docs/sql.md).
    EXECUTE format($v$
    CREATE OR REPLACE VIEW rollup_1d AS
    SELECT d.target_id, g.region, d.bucket, d.probes, d.up, d.outcomes, d.total_hist,
           d.dns_hist, d.connect_hist, d.tls_hist, d.ttfb_hist, d.transfer_hist
      FROM rollup_1d_data AS d JOIN regions AS g ON g.region_id = d.region_id
    UNION ALL
    SELECT x.target_id, g.region, x.bucket, x.probes, x.up, x.outcomes, x.total_hist,
           x.dns_hist, x.connect_hist, x.tls_hist, x.ttfb_hist, x.transfer_hist
      FROM (%s) AS x JOIN regions AS g ON g.region_id = x.region_id
    %s $v$,
        vantage_agg_sql('day', 'results_raw AS r', 'r.started_at >= vantage_hour_through()'),
        CASE WHEN with_v8 THEN format('UNION ALL SELECT %s FROM rollup_1d_v8 WHERE bucket < %L',
                                      cols, v8_from) ELSE '' END);

    EXECUTE format($v$
    CREATE OR REPLACE VIEW rollup_percentiles AS
    WITH r AS (
        SELECT resolution, target_id, region, bucket, sum(probes) AS probes, sum(up) AS up,
               vantage_jsonb_sum_agg(outcomes) AS outcomes,
               vantage_hist_merge_agg(total_hist) AS total_hist,
               vantage_hist_merge_agg(dns_hist) AS dns_hist,
               vantage_hist_merge_agg(connect_hist) AS connect_hist,
               vantage_hist_merge_agg(tls_hist) AS tls_hist,
               vantage_hist_merge_agg(ttfb_hist) AS ttfb_hist,
               vantage_hist_merge_agg(transfer_hist) AS transfer_hist
          FROM (SELECT '1m' AS resolution, * FROM rollup_1m
                UNION ALL SELECT '1h', * FROM rollup_1h
                UNION ALL SELECT '1d', * FROM rollup_1d) AS parts
         GROUP BY 1, 2, 3, 4
    )
    SELECT resolution, target_id, region, bucket, probes, up, outcomes,
           vantage_hist_quantile(total_hist, 0.5) / 1000 AS total_p50_ms,
           vantage_hist_quantile(total_hist, 0.9) / 1000 AS total_p90_ms,
           vantage_hist_quantile(total_hist, 0.99) / 1000 AS total_p99_ms,
           vantage_hist_quantile(dns_hist, 0.5) / 1000 AS dns_p50_ms,
           vantage_hist_quantile(connect_hist, 0.5) / 1000 AS connect_p50_ms,
           vantage_hist_quantile(tls_hist, 0.5) / 1000 AS tls_p50_ms,
           vantage_hist_quantile(ttfb_hist, 0.5) / 1000 AS ttfb_p50_ms,
           vantage_hist_quantile(ttfb_hist, 0.9) / 1000 AS ttfb_p90_ms,
           vantage_hist_quantile(ttfb_hist, 0.99) / 1000 AS ttfb_p99_ms,
           vantage_hist_quantile(transfer_hist, 0.5) / 1000 AS transfer_p50_ms
      FROM r $v$);
END
$$;

SELECT vantage_define_views(to_regclass('results_v8') IS NOT NULL);

CREATE OR REPLACE FUNCTION vantage_insert_result() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    PERFORM vantage_ensure_dims(ARRAY[NEW.region], ARRAY[NEW.agent], ARRAY[NEW.outcome],
                                ARRAY[NEW.failed_phase]);
    INSERT INTO results_raw (boot_id, seq, started_at, ingested_at, cert_not_after, agent_id,
                             target_id, total_us, body_bytes, dns_us, connect_us, tls_us,
                             ttfb_us, transfer_us, region_id, outcome_id, failed_phase_id,
                             status, redirects, regex_match, body_truncated, remote_ip,
                             clock_error_ms, clock_unsynced)
    SELECT NEW.boot_id, NEW.seq, NEW.started_at, coalesce(NEW.ingested_at, now()),
           NEW.cert_not_after, a.agent_id, NEW.target_id, NEW.total_us, NEW.body_bytes,
           NEW.dns_us, NEW.connect_us, NEW.tls_us, NEW.ttfb_us, NEW.transfer_us, g.region_id,
           o.outcome_id, (SELECT phase_id FROM phases WHERE phase = NEW.failed_phase),
           NEW.status, coalesce(NEW.redirects, 0), NEW.regex_match,
           coalesce(NEW.body_truncated, false), NEW.remote_ip, NEW.clock_error_ms,
           NEW.clock_unsynced
      FROM agents AS a, regions AS g, outcomes AS o
     WHERE a.agent = NEW.agent AND g.region = NEW.region AND o.outcome = NEW.outcome
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n = 0 THEN
        RETURN NULL;   -- already stored: not counted as inserted
    END IF;
    INSERT INTO rollup_pending VALUES (
        ARRAY[NEW.target_id], ARRAY[date_trunc('hour', NEW.started_at, 'UTC')],
        ARRAY[NEW.target_id], ARRAY[NEW.region], ARRAY[NEW.started_at]);
    RETURN NEW;
END
$$;

ALTER TABLE agents
    ADD COLUMN clock_boot_id    bigint,       -- the agent boot of the latest clock state
    ADD COLUMN clock_synced     boolean,      -- the kernel's clock was synchronised
    ADD COLUMN clock_error_ms   integer,      -- its maximum error, ms
    ADD COLUMN clock_boot_age_s bigint,       -- time since the machine booted, s
    ADD COLUMN clock_offset_ms  bigint,       -- agent seal time minus bridge receive time (positive: ahead)
    ADD COLUMN clock_flag       text,         -- 'offset' | 'unsynced' | NULL (fine)
    ADD COLUMN clock_at         timestamptz;  -- the bridge's receive time of that batch

-- The fleet view of 0005 with the clock state appended.
CREATE OR REPLACE VIEW fleet AS
SELECT agent, region, version,
       CASE WHEN NOT online THEN 'offline'
            WHEN last_seen < now() - interval '90 seconds' THEN 'stale'
            ELSE 'online' END AS status,
       last_seen, first_seen, state, state_at, boot_id, targets, pending_results,
       region_set_generation, agent_set_generation, rejected_scope, rejected_generation, rejection,
       clock_skew_results, clock_skew_ms, clock_skew_at,
       clock_synced, clock_error_ms, clock_boot_age_s, clock_offset_ms, clock_flag, clock_at
  FROM agents;
