-- 0017 (issue #20, the `dns` kind): a DNS query to a resolver, recorded with the reply's
-- response code and answer count (the query time is `dns_us`; a TCP fallback's connection
-- time `connect_us`).
--
-- 1. The kind's `probe_kinds` row: kind_id 3 = vantage_proto::ProbeKind::Dns's wire index.
-- 2. results_raw gets `dns_rcode` (RFC 1035 RCODE: 0 NOERROR, 2 SERVFAIL, 3 NXDOMAIN, 5
--    REFUSED...) and `dns_answers` (ANCOUNT, up to 65535, hence integer), both NULL unless a
--    dns probe got a reply. Nullable columns at the end: a catalog change, no table rewrite;
--    every existing row reads NULL. The new outcome `dns_server_failure` needs no row here:
--    the sink adds outcomes as they arrive (vantage_ensure_dims).
-- 3. The `results` view shows both, appended (vantage_define_views restated as 0016 did, the
--    same text but for the two columns), and its INSERT trigger writes them.
-- Rollups and region_comparison are not touched: they are per target and a target has one
-- kind, so `region_comparison(since, target, 'dns')` compares dns targets by region already.

INSERT INTO probe_kinds (kind_id, kind) VALUES (3, 'dns');

ALTER TABLE results_raw
    ADD COLUMN dns_rcode   smallint,   -- RCODE of a dns probe's reply; NULL: no reply, other kinds
    ADD COLUMN dns_answers integer;    -- ANCOUNT of that reply

CREATE OR REPLACE FUNCTION vantage_define_views(with_v8 boolean) RETURNS void
    LANGUAGE plpgsql AS $$
DECLARE
    cols constant text := 'target_id, region, bucket, probes, up, outcomes, total_hist, dns_hist,
                           connect_hist, tls_hist, ttfb_hist, transfer_hist';
    v8_from constant timestamptz := (SELECT CASE WHEN s.hour_through = '-infinity' THEN s.hour_through
                                                  ELSE date_trunc('day', s.hour_through, 'UTC') END
                                       FROM rollup_state AS s);
BEGIN
    -- Raw results, with names for the ids (0013: and the clock state of each; 0016: the probe
    -- kind, NULL kind_id being http, and the TLS version by name; 0017: a dns reply's RCODE
    -- and answer count).
    EXECUTE format($v$
    CREATE OR REPLACE VIEW results AS
    SELECT g.region, a.agent, r.boot_id, r.seq, r.target_id, r.started_at, r.status,
           o.outcome, r.regex_match, r.total_us, r.dns_us, r.connect_us, r.tls_us, r.ttfb_us,
           r.body_bytes, r.ingested_at, p.phase AS failed_phase, r.transfer_us,
           r.body_truncated, r.redirects, r.cert_not_after, r.remote_ip, r.clock_error_ms,
           r.clock_unsynced, coalesce(k.kind, 'http') AS kind,
           vantage_tls_version_name(r.tls_version) AS tls_version, r.dns_rcode, r.dns_answers
      FROM results_raw AS r
      JOIN regions AS g ON g.region_id = r.region_id
      JOIN agents AS a ON a.agent_id = r.agent_id
      JOIN outcomes AS o ON o.outcome_id = r.outcome_id
      LEFT JOIN phases AS p ON p.phase_id = r.failed_phase_id
      LEFT JOIN probe_kinds AS k ON k.kind_id = r.kind_id
    %s $v$,
        CASE WHEN with_v8 THEN
            'UNION ALL SELECT region, agent, boot_id, seq, target_id, started_at, status, outcome,
                    regex_match, total_us, dns_us, connect_us, tls_us, ttfb_us, body_bytes,
                    ingested_at, failed_phase, transfer_us, body_truncated, redirects,
                    cert_not_after, remote_ip, NULL::integer, NULL::boolean, ''http''::text,
                    NULL::text, NULL::smallint, NULL::integer FROM results_v8'
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
    IF NEW.kind IS NOT NULL AND NOT EXISTS (SELECT 1 FROM probe_kinds WHERE kind = NEW.kind) THEN
        RAISE EXCEPTION 'unknown probe kind %', NEW.kind USING ERRCODE = '22023';
    END IF;
    PERFORM vantage_ensure_dims(ARRAY[NEW.region], ARRAY[NEW.agent], ARRAY[NEW.outcome],
                                ARRAY[NEW.failed_phase]);
    INSERT INTO results_raw (boot_id, seq, started_at, ingested_at, cert_not_after, agent_id,
                             target_id, total_us, body_bytes, dns_us, connect_us, tls_us,
                             ttfb_us, transfer_us, region_id, outcome_id, failed_phase_id,
                             status, redirects, regex_match, body_truncated, remote_ip,
                             clock_error_ms, clock_unsynced, kind_id, tls_version, dns_rcode,
                             dns_answers)
    SELECT NEW.boot_id, NEW.seq, NEW.started_at, coalesce(NEW.ingested_at, now()),
           NEW.cert_not_after, a.agent_id, NEW.target_id, NEW.total_us, NEW.body_bytes,
           NEW.dns_us, NEW.connect_us, NEW.tls_us, NEW.ttfb_us, NEW.transfer_us, g.region_id,
           o.outcome_id, (SELECT phase_id FROM phases WHERE phase = NEW.failed_phase),
           NEW.status, coalesce(NEW.redirects, 0), NEW.regex_match,
           coalesce(NEW.body_truncated, false), NEW.remote_ip, NEW.clock_error_ms,
           NEW.clock_unsynced,
           nullif((SELECT kind_id FROM probe_kinds WHERE kind = NEW.kind), 0),
           vantage_tls_version_code(NEW.tls_version), NEW.dns_rcode, NEW.dns_answers
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
