-- 0011: storage upkeep yields to readers and the sink; it never deadlocks them.
--
-- CI of 2026-12-02 failed with "deadlock detected" in a test reading the `results` view while
-- the sink's first upkeep finished moving the (empty) pre-0009 tables: a reader locks a view,
-- then the tables under it in order; vantage_migrate_v8 dropped the `_v8` partitions one by
-- one (locking results_v8) and asked for the views last, when it redefined them. Each held what
-- the other wanted next, and PostgreSQL cancelled the reader. tests/storage.rs
-- finishing_the_pre_0009_move_never_deadlocks_a_reader forces that interleaving.
--
-- 1. vantage_migrate_v8 as in 0009, except that empty `_v8` partitions are no longer dropped
--    one by one (the final DROP of the parents removes them) and the final step locks the views
--    before anything under them, so it waits for readers instead of deadlocking with them.
-- 2. The upkeep functions that take exclusive locks (partitions created and attached, expired
--    partitions dropped, the move's final step) wait at most 500 ms for a lock. That is below
--    PostgreSQL's deadlock_timeout (1 s): if a lock cycle forms anyway it is upkeep that gives up
--    (SQLSTATE 55P03, retried by the sink's upkeep with backoff), never a reader or the sink;
--    and readers queued behind upkeep's exclusive request are held up half a second at most.
--    The idea is GitLab's `with_lock_retries` for migrations on busy tables: a short lock
--    timeout and a retry rather than a long queue.

CREATE OR REPLACE FUNCTION vantage_migrate_v8(batch integer DEFAULT 50000) RETURNS bigint
    LANGUAGE plpgsql AS $$
DECLARE
    part text;
    v8_from timestamptz;
    b0 timestamptz;
    n bigint := 0;
BEGIN
    IF to_regclass('results_v8') IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext(current_schema() || '.vantage_migrate_v8'));
    IF to_regclass('results_v8') IS NULL THEN
        RETURN 0;
    END IF;
    SELECT CASE WHEN s.hour_through = '-infinity' THEN s.hour_through
                ELSE date_trunc('day', s.hour_through, 'UTC') END
      INTO v8_from FROM rollup_state AS s;

    -- Raw rows.
    FOR part IN
        SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'results_v8'::regclass
         ORDER BY c.relname = 'results_v8_default', c.relname DESC
    LOOP
        CREATE TEMP TABLE IF NOT EXISTS vantage_v8_batch (LIKE results_v8) ON COMMIT DROP;
        TRUNCATE vantage_v8_batch;
        EXECUTE format(
            'WITH moved AS (DELETE FROM %I WHERE ctid = ANY (ARRAY(SELECT ctid FROM %I LIMIT $1))
                            RETURNING *)
             INSERT INTO vantage_v8_batch SELECT * FROM moved', part, part) USING batch;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n = 0 THEN
            -- Left for the final DROP (dropping a partition here would lock results_v8
            -- before the views: see above).
            CONTINUE;
        END IF;
        PERFORM vantage_ensure_dims(array_agg(region), array_agg(agent),
                                    array_agg(DISTINCT outcome), array_agg(DISTINCT failed_phase))
           FROM (SELECT DISTINCT ON (agent) agent, region, outcome, failed_phase
                   FROM vantage_v8_batch) AS m;
        PERFORM vantage_ensure_dims('{}', '{}', array_agg(DISTINCT outcome),
                                    array_agg(DISTINCT failed_phase))
           FROM vantage_v8_batch;
        INSERT INTO results_raw (boot_id, seq, started_at, ingested_at, cert_not_after,
                                 agent_id, target_id, total_us, body_bytes, dns_us,
                                 connect_us, tls_us, ttfb_us, transfer_us, region_id,
                                 outcome_id, failed_phase_id, status, redirects,
                                 regex_match, body_truncated, remote_ip)
        SELECT m.boot_id, m.seq, m.started_at, m.ingested_at, m.cert_not_after, a.agent_id,
               m.target_id, m.total_us, m.body_bytes, m.dns_us, m.connect_us, m.tls_us,
               m.ttfb_us, m.transfer_us, g.region_id, o.outcome_id, p.phase_id, m.status,
               m.redirects, m.regex_match, m.body_truncated, m.remote_ip
          FROM vantage_v8_batch AS m
          JOIN agents AS a ON a.agent = m.agent
          JOIN regions AS g ON g.region = m.region
          JOIN outcomes AS o ON o.outcome = m.outcome
          LEFT JOIN phases AS p ON p.phase = m.failed_phase
        ON CONFLICT DO NOTHING;
        INSERT INTO rollup_pending
        SELECT array_agg(x.t), array_agg(x.h), '{}', '{}', '{}'
          FROM (SELECT DISTINCT target_id AS t, date_trunc('hour', started_at, 'UTC') AS h
                  FROM vantage_v8_batch WHERE started_at >= v8_from) AS x
        HAVING count(*) > 0;
        RETURN n;
    END LOOP;

    -- Hourly rollups: one day of buckets per call.
    IF to_regclass('rollup_1h_v8') IS NOT NULL THEN
        SELECT min(bucket) INTO b0 FROM rollup_1h_v8 WHERE bucket < v8_from;
        IF b0 IS NOT NULL THEN
            EXECUTE format(
                'WITH moved AS (DELETE FROM rollup_1h_v8 WHERE bucket >= $1 AND bucket < $2 RETURNING *),
                 src AS (SELECT 1 AS sign, m.*, g.region_id FROM moved AS m JOIN regions AS g USING (region))
                 INSERT INTO rollup_1h_data (target_id, region_id, bucket, probes, up, outcomes,
                                             total_hist, dns_hist, connect_hist, tls_hist,
                                             ttfb_hist, transfer_hist) %s',
                vantage_merge_sql('hour', 'src'))
                USING b0, least(b0 + interval '1 day', v8_from);
            GET DIAGNOSTICS n = ROW_COUNT;
            RETURN greatest(n, 1);
        END IF;
    END IF;

    -- Daily rollups: one month per call.
    IF to_regclass('rollup_1d_v8') IS NOT NULL THEN
        SELECT min(bucket) INTO b0 FROM rollup_1d_v8 WHERE bucket < v8_from;
        IF b0 IS NOT NULL THEN
            EXECUTE format(
                'WITH moved AS (DELETE FROM rollup_1d_v8 WHERE bucket >= $1 AND bucket < $2 RETURNING *),
                 src AS (SELECT 1 AS sign, m.*, g.region_id FROM moved AS m JOIN regions AS g USING (region))
                 INSERT INTO rollup_1d_data (target_id, region_id, bucket, probes, up, outcomes,
                                             total_hist, dns_hist, connect_hist, tls_hist,
                                             ttfb_hist, transfer_hist) %s',
                vantage_merge_sql('day', 'src'))
                USING b0, least(b0 + interval '31 days', v8_from);
            GET DIAGNOSTICS n = ROW_COUNT;
            RETURN greatest(n, 1);
        END IF;
    END IF;

    -- Everything moved. The views first, in one statement (which also locks, recursively,
    -- every table they read), then the tables under them: the order in which a reader locks.
    LOCK TABLE results, rollup_1m, rollup_1h, rollup_1d, rollup_percentiles
        IN ACCESS EXCLUSIVE MODE;
    PERFORM vantage_define_views(false);
    DROP TABLE rollup_1h_v8, rollup_1d_v8, results_v8;
    RETURN 0;
END
$$;

ALTER FUNCTION vantage_migrate_v8(integer) SET lock_timeout = '500ms';
ALTER FUNCTION vantage_ensure_partitions(integer, integer, integer) SET lock_timeout = '500ms';
ALTER FUNCTION vantage_apply_retention(interval, interval, boolean, interval)
    SET lock_timeout = '500ms';
