-- 0005: agent clocks are not trusted, and upkeep leaves a trace (issue #14).
--
-- The sink refuses results whose time is outside a window around the bridge's clock (the Kafka
-- record timestamp) and dead-letters them as `clock_skew` (ingester/src/clock.rs); this counts
-- them per agent. Upkeep adopts rows waiting in a default partition only inside a bounded window,
-- so one bad day per row can no longer make it create a partition per day; and retention reports
-- what it drops or deletes, with row counts, so nothing goes without a trace.

-- Agents: results refused for clock skew ----------------------------------------------------------
ALTER TABLE agents
    ADD COLUMN clock_skew_results bigint NOT NULL DEFAULT 0,  -- dead-lettered as clock_skew (at least: a replay after a crash can count again)
    ADD COLUMN clock_skew_ms      bigint,       -- latest refused frame: started_at minus the bridge's time of its result furthest off (negative: the agent is behind)
    ADD COLUMN clock_skew_at      timestamptz;  -- the bridge's time of that result

-- The fleet view of 0004 with the clock columns appended.
CREATE OR REPLACE VIEW fleet AS
SELECT agent, region, version,
       CASE WHEN NOT online THEN 'offline'
            WHEN last_seen < now() - interval '90 seconds' THEN 'stale'
            ELSE 'online' END AS status,
       last_seen, first_seen, state, state_at, boot_id, targets, pending_results,
       region_set_generation, agent_set_generation, rejected_scope, rejected_generation, rejection,
       clock_skew_results, clock_skew_ms, clock_skew_at
  FROM agents;

-- Adoption of default-partition rows, bounded ------------------------------------------------------

-- Moves the rows waiting in the default partitions whose time is in [from_ts, to_ts) into
-- partitions of their own (daily for results and 1-minute rollups, monthly for 1-hour and
-- 1-day rollups), creating them. Returns how many partitions it created. Upkeep calls it with a
-- bounded window (vantage_ensure_partitions); an operator may call it for any other range.
CREATE FUNCTION vantage_adopt_default(from_ts timestamptz, to_ts timestamptz) RETURNS integer
    LANGUAGE plpgsql AS $$
DECLARE
    d date;
    m date;
    created integer := 0;
BEGIN
    FOR d IN
        SELECT DISTINCT (started_at AT TIME ZONE 'UTC')::date FROM results_default
         WHERE started_at >= from_ts AND started_at < to_ts
        UNION
        SELECT DISTINCT (bucket AT TIME ZONE 'UTC')::date FROM rollup_1m_default
         WHERE bucket >= from_ts AND bucket < to_ts
    LOOP
        created := created + vantage_create_partition('results', 'results_p' || to_char(d, 'YYYYMMDD'),
                       d::timestamp AT TIME ZONE 'UTC', (d + 1)::timestamp AT TIME ZONE 'UTC',
                       'started_at')::integer;
        created := created + vantage_create_partition('rollup_1m', 'rollup_1m_p' || to_char(d, 'YYYYMMDD'),
                       d::timestamp AT TIME ZONE 'UTC', (d + 1)::timestamp AT TIME ZONE 'UTC',
                       'bucket')::integer;
    END LOOP;
    FOR m IN
        SELECT DISTINCT date_trunc('month', bucket AT TIME ZONE 'UTC')::date FROM rollup_1h_default
         WHERE bucket >= from_ts AND bucket < to_ts
        UNION
        SELECT DISTINCT date_trunc('month', bucket AT TIME ZONE 'UTC')::date FROM rollup_1d_default
         WHERE bucket >= from_ts AND bucket < to_ts
    LOOP
        created := created + vantage_create_partition('rollup_1h', 'rollup_1h_p' || to_char(m, 'YYYYMM'),
                       m::timestamp AT TIME ZONE 'UTC', (m + interval '1 month')::timestamp AT TIME ZONE 'UTC',
                       'bucket')::integer;
        created := created + vantage_create_partition('rollup_1d', 'rollup_1d_p' || to_char(m, 'YYYYMM'),
                       m::timestamp AT TIME ZONE 'UTC', (m + interval '1 month')::timestamp AT TIME ZONE 'UTC',
                       'bucket')::integer;
    END LOOP;
    RETURN created;
END
$$;

-- Replaces 0003's version, which made a partition for every distinct day found in a default
-- partition: a clock a year behind or twenty years ahead invented a partition per result.
-- Partitions from `back` days ago to `ahead` days ahead (UTC days; months for the rollups that
-- are monthly), then the default-partition rows of the days retention keeps (`keep_days` back)
-- up to `ahead` days ahead. Rows outside that window stay in the default partition (readers see
-- them; retention deletes them when they expire and reports it). Returns how many partitions
-- it created.
DROP FUNCTION vantage_ensure_partitions(integer, integer);
CREATE FUNCTION vantage_ensure_partitions(ahead integer DEFAULT 7, back integer DEFAULT 1,
                                          keep_days integer DEFAULT 30)
    RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    d date;
    m date;
    created integer := 0;
BEGIN
    FOR d IN SELECT generate_series(today - back, today + ahead, '1 day')::date LOOP
        created := created + vantage_create_partition('results', 'results_p' || to_char(d, 'YYYYMMDD'),
                       d::timestamp AT TIME ZONE 'UTC', (d + 1)::timestamp AT TIME ZONE 'UTC',
                       'started_at')::integer;
        created := created + vantage_create_partition('rollup_1m', 'rollup_1m_p' || to_char(d, 'YYYYMMDD'),
                       d::timestamp AT TIME ZONE 'UTC', (d + 1)::timestamp AT TIME ZONE 'UTC',
                       'bucket')::integer;
    END LOOP;
    FOR m IN
        SELECT DISTINCT date_trunc('month', x)::date
          FROM generate_series(today - back, today + ahead, '1 day') AS x
    LOOP
        created := created + vantage_create_partition('rollup_1h', 'rollup_1h_p' || to_char(m, 'YYYYMM'),
                       m::timestamp AT TIME ZONE 'UTC', (m + interval '1 month')::timestamp AT TIME ZONE 'UTC',
                       'bucket')::integer;
        created := created + vantage_create_partition('rollup_1d', 'rollup_1d_p' || to_char(m, 'YYYYMM'),
                       m::timestamp AT TIME ZONE 'UTC', (m + interval '1 month')::timestamp AT TIME ZONE 'UTC',
                       'bucket')::integer;
    END LOOP;
    created := created + vantage_adopt_default((today - greatest(keep_days, back))::timestamp AT TIME ZONE 'UTC',
                                               (today + ahead + 1)::timestamp AT TIME ZONE 'UTC');
    RETURN created;
END
$$;

-- Retention that reports what it removes ------------------------------------------------------------

-- Replaces 0003's version (which returned only the names of dropped partitions and deleted
-- expired default-partition rows and gaps without a word). One row per partition dropped and
-- per table whose expired rows were deleted, with the number of rows; with `dry_run`, the same
-- rows for what it would remove, and nothing is removed.
DROP FUNCTION vantage_apply_retention(interval, interval);
CREATE FUNCTION vantage_apply_retention(raw_keep interval, hourly_keep interval,
                                        dry_run boolean DEFAULT false)
    RETURNS TABLE (relation text, removed_rows bigint) LANGUAGE plpgsql AS $$
DECLARE
    p record;
    t record;
    raw_cut timestamptz := now() - raw_keep;
    hourly_cut timestamptz := now() - hourly_keep;
    cut timestamptz;
    n bigint;
BEGIN
    FOR p IN
        SELECT c.relname AS name, parent.relname AS parent,
               (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \(''([^'']+)''\)'))[1]::timestamptz AS upper
          FROM pg_inherits i
          JOIN pg_class c ON c.oid = i.inhrelid
          JOIN pg_class parent ON parent.oid = i.inhparent
         WHERE parent.relname IN ('results', 'rollup_1m', 'rollup_1h', 'rollup_1d')
           AND parent.relnamespace = current_schema()::regnamespace
           AND c.relname NOT LIKE '%\_default'
         ORDER BY 1
    LOOP
        cut := CASE WHEN p.parent IN ('rollup_1h', 'rollup_1d') THEN hourly_cut ELSE raw_cut END;
        IF p.upper <= cut THEN
            EXECUTE format('SELECT count(*) FROM %I', p.name) INTO n;
            IF NOT dry_run THEN
                EXECUTE format('DROP TABLE %I', p.name);
            END IF;
            relation := p.name;
            removed_rows := n;
            RETURN NEXT;
        END IF;
    END LOOP;
    FOR t IN SELECT * FROM (VALUES ('results_default', 'started_at', raw_cut),
                                   ('rollup_1m_default', 'bucket', raw_cut),
                                   ('rollup_1h_default', 'bucket', hourly_cut),
                                   ('rollup_1d_default', 'bucket', hourly_cut),
                                   ('gaps', 'first_started_at', raw_cut)) AS x(tbl, col, cut)
    LOOP
        IF dry_run THEN
            EXECUTE format('SELECT count(*) FROM %I WHERE %I < $1', t.tbl, t.col) INTO n USING t.cut;
        ELSE
            EXECUTE format('DELETE FROM %I WHERE %I < $1', t.tbl, t.col) USING t.cut;
            GET DIAGNOSTICS n = ROW_COUNT;
        END IF;
        IF n > 0 THEN
            relation := t.tbl;
            removed_rows := n;
            RETURN NEXT;
        END IF;
    END LOOP;
END
$$;
