-- 0003: storage that lasts. Results and 1-minute rollups partitioned by day, 1-hour and 1-day
-- rollups by month; rollups kept by a trigger from the rows actually inserted; latest status per target and
-- region; dimension tables; the SQL interface (views and functions) documented in docs/sql.md.
--
-- Why daily partitions: raw results are kept for weeks, not years (the hourly rollups carry the
-- history), so a day is the natural unit of retention (dropping one partition is instant and
-- leaves no bloat), a "last 24 hours" query touches two partitions, and each partition's indexes
-- stay small enough to be cached. At 10 million results a month a day holds ~330,000 rows.

-- Histograms -----------------------------------------------------------------------------------
-- Latencies are counted in log buckets of factor 1.02 over microseconds: bucket i holds values
-- in [1.02^i, 1.02^(i+1)); values below 1 us are bucket -1. A bucket is reported as its geometric
-- middle, so a percentile read from a histogram is within 1% (1.02^0.5 - 1 = 0.995%) of the
-- sample the exact nearest-rank percentile would pick. Two histograms merge by adding counts,
-- so rollups merge across time, regions or replays without losing the bound.
--
-- A histogram is a sparse int8[] of entries sorted by bucket, each entry packing
-- (bucket + 1) << 32 | count: one array per phase, unpacked by plain integer arithmetic
-- (vantage_hist_entries), which keeps merging many rollup rows a native GROUP BY.
--
-- These small SQL functions are deliberately not STRICT: PostgreSQL inlines a SQL function
-- into the calling query only if it is not STRICT (or its body is), and inlining is what makes
-- them as cheap as writing the expression out (measured: 10x on the insert trigger).

CREATE FUNCTION vantage_hist_bucket(us integer) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN us < 1 THEN -1 ELSE floor(ln(us::float8) / ln(1.02))::integer END;

CREATE FUNCTION vantage_hist_value(bucket integer) RETURNS float8
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN bucket < 0 THEN 0 ELSE power(1.02::float8, bucket + 0.5) END;

CREATE FUNCTION vantage_hist_entry(bucket integer, n bigint) RETURNS int8
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN ((bucket + 1)::int8 << 32) | n;

-- The (bucket, count) pairs of a histogram.
CREATE FUNCTION vantage_hist_entries(hist int8[]) RETURNS TABLE (bucket integer, n bigint)
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ((x >> 32) - 1)::integer, x & 4294967295 FROM unnest(hist) AS x
$$;

-- A histogram from (bucket, count) rows: sorted, one entry per bucket.
CREATE FUNCTION vantage_hist_merge(a int8[], b int8[]) RETURNS int8[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN (SELECT coalesce(array_agg(vantage_hist_entry(bucket, n) ORDER BY bucket), '{}')
              FROM (SELECT bucket, sum(n)::int8 AS n
                      FROM (SELECT * FROM vantage_hist_entries(a)
                            UNION ALL
                            SELECT * FROM vantage_hist_entries(b)) AS e
                     GROUP BY bucket) AS t);

-- Aggregate: the merge of many histograms (ad-hoc queries; views and reports use GROUP BY over
-- vantage_hist_entries, which is faster over many rows).
CREATE AGGREGATE vantage_hist_merge_agg(int8[]) (
    SFUNC = vantage_hist_merge,
    STYPE = int8[],
    INITCOND = '{}'
);

-- Aggregate: the histogram of raw microsecond values (NULLs skipped), for ad-hoc queries.
CREATE FUNCTION vantage_hist_collect(state integer[], us integer) RETURNS integer[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN us IS NULL THEN state ELSE state || vantage_hist_bucket(us) END;

CREATE FUNCTION vantage_hist_from_buckets(buckets integer[]) RETURNS int8[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN (SELECT coalesce(array_agg(vantage_hist_entry(b, n) ORDER BY b), '{}')
              FROM (SELECT b, count(*) AS n FROM unnest(buckets) AS b GROUP BY b) AS t);

CREATE AGGREGATE vantage_hist_agg(integer) (
    SFUNC = vantage_hist_collect,
    STYPE = integer[],
    FINALFUNC = vantage_hist_from_buckets,
    INITCOND = '{}'
);

-- The q-quantile (0..1, nearest rank) of a histogram, in microseconds; NULL when empty.
CREATE FUNCTION vantage_hist_quantile(hist int8[], q float8) RETURNS float8
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN (SELECT vantage_hist_value(bucket)
              FROM (SELECT bucket, sum(n) OVER (ORDER BY bucket) AS running,
                           sum(n) OVER () AS total
                      FROM vantage_hist_entries(hist)) AS h
             WHERE running >= greatest(ceil(q * total), 1)
             ORDER BY bucket
             LIMIT 1);

-- Outcome counts are small jsonb objects {"outcome": count}.

-- Sum of two objects of counts, key by key: {"a": 1} + {"a": 2, "b": 1} = {"a": 3, "b": 1}.
CREATE FUNCTION vantage_jsonb_sum(a jsonb, b jsonb) RETURNS jsonb
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN (SELECT coalesce(jsonb_object_agg(k, s), '{}'::jsonb)
              FROM (SELECT k, sum(v::bigint) AS s
                      FROM (SELECT * FROM jsonb_each_text(coalesce(a, '{}'::jsonb))
                            UNION ALL
                            SELECT * FROM jsonb_each_text(coalesce(b, '{}'::jsonb))) AS e(k, v)
                     GROUP BY k) AS t);

-- The (key, count) pairs of a count object. PL/pgSQL on purpose: it is not inlined, so the
-- planner uses its ROWS estimate (a handful of outcomes per row) instead of jsonb_each's 100,
-- whose inflated estimates made PostgreSQL JIT-compile region_comparison (0.6 s, measured).
CREATE FUNCTION vantage_count_entries(counts jsonb) RETURNS TABLE (k text, n bigint)
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE ROWS 2 AS $$
BEGIN
    RETURN QUERY SELECT e.key, e.value::bigint FROM jsonb_each_text(counts) AS e;
END
$$;

CREATE AGGREGATE vantage_jsonb_sum_agg(jsonb) (
    SFUNC = vantage_jsonb_sum,
    STYPE = jsonb,
    INITCOND = '{}'
);

-- Aggregate: counts of each distinct text value, as {"value": count}.
CREATE FUNCTION vantage_count_add(state jsonb, value text) RETURNS jsonb
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN value IS NULL THEN state
                ELSE jsonb_set(state, ARRAY[value], to_jsonb(coalesce((state ->> value)::bigint, 0) + 1))
           END;

CREATE AGGREGATE vantage_count_agg(text) (
    SFUNC = vantage_count_add,
    STYPE = jsonb,
    INITCOND = '{}'
);

-- The most frequent key of a count object other than `except_key` (ties: alphabetical).
CREATE FUNCTION vantage_top_key(counts jsonb, except_key text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN (SELECT k FROM jsonb_each_text(counts) AS e(k, v)
             WHERE k IS DISTINCT FROM except_key
             ORDER BY v::bigint DESC, k
             LIMIT 1);

-- Dimensions ------------------------------------------------------------------------------------

CREATE TABLE regions (
    region      text PRIMARY KEY,
    first_seen  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE agents (
    agent       text PRIMARY KEY,
    region      text NOT NULL REFERENCES regions,
    first_seen  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE targets (
    target_id   integer PRIMARY KEY,
    first_seen  timestamptz NOT NULL DEFAULT now()
);

-- Results, partitioned by day -------------------------------------------------------------------

ALTER TABLE results RENAME TO results_0001;
ALTER TABLE results_0001 RENAME CONSTRAINT results_pkey TO results_0001_pkey;
ALTER INDEX results_target_region_time RENAME TO results_0001_target_region_time;
ALTER INDEX results_started_at RENAME TO results_0001_started_at;

CREATE TABLE results (LIKE results_0001 INCLUDING DEFAULTS) PARTITION BY RANGE (started_at);
-- The natural key plus the partition column (PostgreSQL requires it in a partitioned unique
-- key). A replayed result carries the same started_at, so it still conflicts.
ALTER TABLE results ADD PRIMARY KEY (agent, boot_id, seq, started_at);
-- Latest per target and region, and time ranges of one target (per partition).
CREATE INDEX results_target_region_time ON results (target_id, region, started_at DESC);
-- Rows whose day has no partition yet (an agent with a wrong clock, very late data) land here
-- instead of failing the insert; maintenance moves them into their own partition.
CREATE TABLE results_default PARTITION OF results DEFAULT;

-- Rollups ---------------------------------------------------------------------------------------

CREATE TABLE rollup_1m (
    target_id     integer     NOT NULL,
    region        text        NOT NULL,
    bucket        timestamptz NOT NULL,   -- start of the minute
    probes        integer     NOT NULL,
    up            integer     NOT NULL,   -- probes whose outcome was 'up'
    outcomes      jsonb       NOT NULL,   -- {"timeout": 2, ...}, every outcome including 'up'
    total_hist    int8[]      NOT NULL,   -- histograms, see vantage_hist_entries
    dns_hist      int8[]      NOT NULL,
    connect_hist  int8[]      NOT NULL,
    tls_hist      int8[]      NOT NULL,
    ttfb_hist     int8[]      NOT NULL,
    transfer_hist int8[]      NOT NULL
    -- No unique key on purpose: every insert statement appends partial rows (see the trigger),
    -- readers sum the rows of a bucket, and upkeep compacts them (vantage_compact_rollups).
) PARTITION BY RANGE (bucket);
-- Target first, then time: one target over a window is one index range.
CREATE INDEX rollup_1m_target_time ON rollup_1m (target_id, bucket, region);
CREATE TABLE rollup_1m_default PARTITION OF rollup_1m DEFAULT;

CREATE TABLE rollup_1h (LIKE rollup_1m INCLUDING DEFAULTS) PARTITION BY RANGE (bucket);
CREATE INDEX rollup_1h_target_time ON rollup_1h (target_id, bucket, region);
-- Every target over a window (monthly partitions are not pruned to the window).
CREATE INDEX rollup_1h_bucket ON rollup_1h (bucket);
CREATE TABLE rollup_1h_default PARTITION OF rollup_1h DEFAULT;

-- Daily rollups answer month-long windows from 30 rows per series instead of 720.
CREATE TABLE rollup_1d (LIKE rollup_1m INCLUDING DEFAULTS) PARTITION BY RANGE (bucket);
CREATE INDEX rollup_1d_target_time ON rollup_1d (target_id, bucket, region);
CREATE INDEX rollup_1d_bucket ON rollup_1d (bucket);
CREATE TABLE rollup_1d_default PARTITION OF rollup_1d DEFAULT;

-- The most recent result of each target from each region.
CREATE TABLE latest_results (
    target_id      integer     NOT NULL,
    region         text        NOT NULL,
    agent          text        NOT NULL,
    started_at     timestamptz NOT NULL,
    status         smallint,
    outcome        text        NOT NULL,
    failed_phase   text,
    total_us       integer     NOT NULL,
    cert_not_after timestamptz,
    PRIMARY KEY (target_id, region)
);

-- After each INSERT/COPY into results: only the rows actually inserted are in the transition
-- table (ON CONFLICT DO NOTHING leaves replays out), so a replay is never counted twice, and a
-- late row lands in the bucket of its own probe time. Runs inside the writer's transaction: the
-- rollups commit or roll back with the rows.
CREATE FUNCTION vantage_after_insert_results() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    level record;
BEGIN
    -- The transition table is visible only in this function (not in functions it calls), so
    -- every rollup level is written here. Histograms and outcome counts are built with plain
    -- GROUP BY (count per histogram bucket, then one array per row), which PostgreSQL does
    -- natively. The rows are *appended*, never merged in place: merging on conflict cost ~80 us
    -- per histogram and made small batches 30x slower (measured), and appends take no row locks,
    -- so two sinks never wait on each other. Readers sum the rows of a bucket; upkeep compacts.
    FOR level IN SELECT * FROM (VALUES ('rollup_1m', 'minute'), ('rollup_1h', 'hour'),
                                       ('rollup_1d', 'day')) AS l(tbl, unit)
    LOOP
        EXECUTE format($q$
            WITH v AS MATERIALIZED (
                SELECT target_id, region, date_trunc(%2$L, started_at, 'UTC') AS bucket, outcome,
                       total_us, dns_us, connect_us, tls_us, ttfb_us, transfer_us
                  FROM inserted_results
            ), counts AS (
                SELECT target_id, region, bucket, count(*) AS probes,
                       count(*) FILTER (WHERE outcome = 'up') AS up
                  FROM v GROUP BY 1, 2, 3
            ), outcomes AS (
                SELECT target_id, region, bucket, jsonb_object_agg(outcome, n) AS outcomes
                  FROM (SELECT target_id, region, bucket, outcome, count(*) AS n
                          FROM v GROUP BY 1, 2, 3, 4) AS o
                 GROUP BY 1, 2, 3
            ), hist AS (
                SELECT target_id, region, bucket, phase,
                       array_agg(vantage_hist_entry(b, n) ORDER BY b) AS h
                  FROM (SELECT target_id, region, bucket, p.phase,
                               vantage_hist_bucket(p.us) AS b, count(*) AS n
                          FROM v CROSS JOIN LATERAL (VALUES (1, total_us), (2, dns_us),
                                   (3, connect_us), (4, tls_us), (5, ttfb_us),
                                   (6, transfer_us)) AS p(phase, us)
                         WHERE p.us IS NOT NULL
                         GROUP BY 1, 2, 3, 4, 5) AS c
                 GROUP BY 1, 2, 3, 4
            ), hists AS (
                SELECT target_id, region, bucket,
                       max(h) FILTER (WHERE phase = 1) AS total_hist,
                       max(h) FILTER (WHERE phase = 2) AS dns_hist,
                       max(h) FILTER (WHERE phase = 3) AS connect_hist,
                       max(h) FILTER (WHERE phase = 4) AS tls_hist,
                       max(h) FILTER (WHERE phase = 5) AS ttfb_hist,
                       max(h) FILTER (WHERE phase = 6) AS transfer_hist
                  FROM hist GROUP BY 1, 2, 3
            )
            INSERT INTO %1$I AS r (target_id, region, bucket, probes, up, outcomes, total_hist,
                                   dns_hist, connect_hist, tls_hist, ttfb_hist, transfer_hist)
            SELECT c.target_id, c.region, c.bucket, c.probes, c.up, o.outcomes,
                   coalesce(h.total_hist, '{}'::int8[]), coalesce(h.dns_hist, '{}'::int8[]),
                   coalesce(h.connect_hist, '{}'::int8[]), coalesce(h.tls_hist, '{}'::int8[]),
                   coalesce(h.ttfb_hist, '{}'::int8[]), coalesce(h.transfer_hist, '{}'::int8[])
              FROM counts AS c
              JOIN outcomes AS o USING (target_id, region, bucket)
              LEFT JOIN hists AS h USING (target_id, region, bucket)
        $q$, level.tbl, level.unit);
    END LOOP;

    INSERT INTO latest_results AS l (target_id, region, agent, started_at, status, outcome,
                                     failed_phase, total_us, cert_not_after)
    SELECT DISTINCT ON (target_id, region)
           target_id, region, agent, started_at, status, outcome, failed_phase, total_us,
           cert_not_after
      FROM inserted_results
     ORDER BY target_id, region, started_at DESC
    ON CONFLICT (target_id, region) DO UPDATE SET
        agent = excluded.agent, started_at = excluded.started_at, status = excluded.status,
        outcome = excluded.outcome, failed_phase = excluded.failed_phase,
        total_us = excluded.total_us, cert_not_after = excluded.cert_not_after
     WHERE l.started_at < excluded.started_at;

    INSERT INTO regions (region)
    SELECT DISTINCT region FROM inserted_results ORDER BY 1 ON CONFLICT DO NOTHING;
    INSERT INTO agents (agent, region)
    SELECT DISTINCT ON (agent) agent, region FROM inserted_results ORDER BY agent
    ON CONFLICT DO NOTHING;
    INSERT INTO targets (target_id)
    SELECT DISTINCT target_id FROM inserted_results ORDER BY 1 ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER results_rollup
    AFTER INSERT ON results
    REFERENCING NEW TABLE AS inserted_results
    FOR EACH STATEMENT EXECUTE FUNCTION vantage_after_insert_results();

-- Partition maintenance -------------------------------------------------------------------------

-- Creates the partition of `parent` for [from, to) named `name` if it does not exist, moving
-- rows of that range out of the default partition first (a new partition cannot overlap rows
-- the default partition holds).
CREATE FUNCTION vantage_create_partition(parent text, name text, from_ts timestamptz,
                                         to_ts timestamptz, col text) RETURNS boolean
    LANGUAGE plpgsql AS $$
BEGIN
    IF to_regclass(quote_ident(name)) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS)', name, parent);
    EXECUTE format(
        'WITH moved AS (DELETE FROM %I WHERE %I >= %L AND %I < %L RETURNING *)
         INSERT INTO %I SELECT * FROM moved',
        parent || '_default', col, from_ts, col, to_ts, name);
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   parent, name, from_ts, to_ts);
    RETURN true;
END
$$;

-- Makes sure partitions exist from `back` days ago to `ahead` days ahead (UTC days; months for
-- rollup_1h), and for every day that has rows waiting in a default partition. Returns how many
-- partitions it created. Called by the sink at start and every few minutes.
CREATE FUNCTION vantage_ensure_partitions(ahead integer DEFAULT 7, back integer DEFAULT 1)
    RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    d date;
    m date;
    created integer := 0;
BEGIN
    FOR d IN
        SELECT generate_series((now() AT TIME ZONE 'UTC')::date - back,
                               (now() AT TIME ZONE 'UTC')::date + ahead, '1 day')::date
        UNION
        SELECT DISTINCT (started_at AT TIME ZONE 'UTC')::date FROM results_default
        UNION
        SELECT DISTINCT (bucket AT TIME ZONE 'UTC')::date FROM rollup_1m_default
    LOOP
        created := created + vantage_create_partition('results', 'results_p' || to_char(d, 'YYYYMMDD'),
                       d::timestamp AT TIME ZONE 'UTC', (d + 1)::timestamp AT TIME ZONE 'UTC',
                       'started_at')::integer;
        created := created + vantage_create_partition('rollup_1m', 'rollup_1m_p' || to_char(d, 'YYYYMMDD'),
                       d::timestamp AT TIME ZONE 'UTC', (d + 1)::timestamp AT TIME ZONE 'UTC',
                       'bucket')::integer;
    END LOOP;
    FOR m IN
        SELECT DISTINCT date_trunc('month', x)::date
          FROM generate_series((now() AT TIME ZONE 'UTC')::date - back,
                               (now() AT TIME ZONE 'UTC')::date + ahead, '1 day') AS x
        UNION
        SELECT DISTINCT date_trunc('month', bucket AT TIME ZONE 'UTC')::date FROM rollup_1h_default
        UNION
        SELECT DISTINCT date_trunc('month', bucket AT TIME ZONE 'UTC')::date FROM rollup_1d_default
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

-- Drops whole partitions that end at or before the cutoffs (raw results and 1-minute rollups
-- older than `raw_keep`, hourly and daily rollups older than `hourly_keep`), and deletes
-- expired rows that sit in the default partitions. Returns the names of the dropped partitions.
CREATE FUNCTION vantage_apply_retention(raw_keep interval, hourly_keep interval)
    RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
    p record;
    raw_cut timestamptz := now() - raw_keep;
    hourly_cut timestamptz := now() - hourly_keep;
    cut timestamptz;
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
    LOOP
        cut := CASE WHEN p.parent IN ('rollup_1h', 'rollup_1d') THEN hourly_cut ELSE raw_cut END;
        IF p.upper <= cut THEN
            EXECUTE format('DROP TABLE %I', p.name);
            RETURN NEXT p.name;
        END IF;
    END LOOP;
    DELETE FROM results_default WHERE started_at < raw_cut;
    DELETE FROM rollup_1m_default WHERE bucket < raw_cut;
    DELETE FROM rollup_1h_default WHERE bucket < hourly_cut;
    DELETE FROM rollup_1d_default WHERE bucket < hourly_cut;
    DELETE FROM gaps WHERE first_started_at < raw_cut;
END
$$;

-- Merges the partial rows of each rollup bucket that ended before now() into one row (readers
-- give the same answers before and after). Returns how many rows it removed. Run by upkeep.
CREATE FUNCTION vantage_compact_rollups() RETURNS bigint
    LANGUAGE plpgsql AS $$
DECLARE
    level record;
    removed bigint := 0;
    n bigint;
BEGIN
    FOR level IN SELECT * FROM (VALUES ('rollup_1m', 'minute'), ('rollup_1h', 'hour'),
                                       ('rollup_1d', 'day')) AS l(tbl, unit)
    LOOP
        EXECUTE format($q$
            WITH split AS (
                SELECT target_id, region, bucket FROM %1$I
                 WHERE bucket < date_trunc(%2$L, now(), 'UTC')
                 GROUP BY 1, 2, 3 HAVING count(*) > 1
            ), old AS (
                DELETE FROM %1$I AS r USING split AS s
                 WHERE r.target_id = s.target_id AND r.region = s.region AND r.bucket = s.bucket
                RETURNING r.*
            ), merged AS (
                INSERT INTO %1$I (target_id, region, bucket, probes, up, outcomes, total_hist,
                                  dns_hist, connect_hist, tls_hist, ttfb_hist, transfer_hist)
                SELECT target_id, region, bucket, sum(probes), sum(up),
                       vantage_jsonb_sum_agg(outcomes), vantage_hist_merge_agg(total_hist),
                       vantage_hist_merge_agg(dns_hist), vantage_hist_merge_agg(connect_hist),
                       vantage_hist_merge_agg(tls_hist), vantage_hist_merge_agg(ttfb_hist),
                       vantage_hist_merge_agg(transfer_hist)
                  FROM old GROUP BY 1, 2, 3
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM old) - (SELECT count(*) FROM merged)
        $q$, level.tbl, level.unit) INTO n;
        removed := removed + n;
    END LOOP;
    RETURN removed;
END
$$;

-- Move existing results (from 0001/0002) into the partitioned table ---------------------------

SELECT vantage_ensure_partitions();
-- Days of existing rows get their partitions via the default partition: insert, then adopt.
INSERT INTO results SELECT * FROM results_0001;
SELECT vantage_ensure_partitions();
DROP TABLE results_0001;

-- The SQL interface (see docs/sql.md) ---------------------------------------------------------

-- Per rollup row of any resolution ('1m', '1h', '1d'), the percentiles most people want, in
-- milliseconds. Filter on `resolution`: the other tables are then not read.
CREATE VIEW rollup_percentiles AS
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
  FROM r;

-- (a) Region comparison of targets over a window, from rollups: minute buckets below 6 hours,
-- hourly buckets below 3 days, daily buckets from there. Whole buckets: the window starts at the
-- bucket that contains now() - since. target NULL = every target. Histograms are merged with
-- plain GROUP BY over their entries, and percentiles read from the running counts.
CREATE FUNCTION region_comparison(since interval, target integer DEFAULT NULL)
    RETURNS TABLE (target_id integer, region text, probes bigint, availability_pct float8,
                   p50_ms float8, p90_ms float8, p95_ms float8, p99_ms float8, top_error text)
    LANGUAGE sql STABLE AS $$
    WITH rows AS MATERIALIZED (
        SELECT r.target_id, r.region, r.probes, r.up, r.outcomes, r.total_hist
          FROM rollup_1m AS r
         WHERE since < interval '6 hours'
           AND r.bucket >= date_trunc('minute', now() - since)
           AND (target IS NULL OR r.target_id = target)
        UNION ALL
        SELECT r.target_id, r.region, r.probes, r.up, r.outcomes, r.total_hist
          FROM rollup_1h AS r
         WHERE since >= interval '6 hours' AND since < interval '3 days'
           AND r.bucket >= date_trunc('hour', now() - since)
           AND (target IS NULL OR r.target_id = target)
        UNION ALL
        SELECT r.target_id, r.region, r.probes, r.up, r.outcomes, r.total_hist
          FROM rollup_1d AS r
         WHERE since >= interval '3 days'
           AND r.bucket >= date_trunc('day', now() - since, 'UTC')
           AND (target IS NULL OR r.target_id = target)
    ), totals AS (
        SELECT target_id, region, sum(probes) AS probes, sum(up) AS up
          FROM rows GROUP BY 1, 2
    ), top_error AS (
        SELECT DISTINCT ON (target_id, region) target_id, region, k AS outcome
          FROM (SELECT target_id, region, e.k, sum(e.n) AS n
                  FROM rows CROSS JOIN LATERAL vantage_count_entries(outcomes) AS e
                 WHERE e.k <> 'up' GROUP BY 1, 2, 3) AS o
         ORDER BY target_id, region, n DESC, k
    ), entries AS (
        SELECT target_id, region, e.bucket AS b, sum(e.n) AS n
          FROM rows CROSS JOIN LATERAL vantage_hist_entries(total_hist) AS e
         GROUP BY 1, 2, 3
    ), running AS (
        SELECT target_id, region, b,
               sum(n) OVER (PARTITION BY target_id, region ORDER BY b) AS running,
               sum(n) OVER (PARTITION BY target_id, region) AS total
          FROM entries
    ), q AS (
        SELECT target_id, region,
               min(b) FILTER (WHERE running >= greatest(ceil(0.50 * total), 1)) AS p50,
               min(b) FILTER (WHERE running >= greatest(ceil(0.90 * total), 1)) AS p90,
               min(b) FILTER (WHERE running >= greatest(ceil(0.95 * total), 1)) AS p95,
               min(b) FILTER (WHERE running >= greatest(ceil(0.99 * total), 1)) AS p99
          FROM running GROUP BY 1, 2
    )
    SELECT t.target_id, t.region, t.probes::bigint, 100.0 * t.up / nullif(t.probes, 0),
           vantage_hist_value(q.p50) / 1000, vantage_hist_value(q.p90) / 1000,
           vantage_hist_value(q.p95) / 1000, vantage_hist_value(q.p99) / 1000, e.outcome
      FROM totals AS t
      LEFT JOIN q USING (target_id, region)
      LEFT JOIN top_error AS e USING (target_id, region)
     ORDER BY t.target_id, t.region
$$;

CREATE VIEW region_comparison_24h AS SELECT * FROM region_comparison(interval '24 hours');

-- (b) Latest status per target per region.
CREATE VIEW latest_status AS
SELECT target_id, region, agent, started_at, outcome, failed_phase, status,
       total_us / 1000.0 AS total_ms, now() - started_at AS age
  FROM latest_results;

-- (c) Targets failing from at least `min_regions` regions, judged by each region's latest
-- result within `within` (a region with no result that recent does not vote). One bad vantage
-- point is not an outage.
CREATE FUNCTION failing_targets(min_regions integer DEFAULT 2,
                                within interval DEFAULT interval '5 minutes')
    RETURNS TABLE (target_id integer, failing_regions bigint, reporting_regions bigint,
                   regions text[], outcomes text[])
    LANGUAGE sql STABLE AS $$
    SELECT target_id,
           count(*) FILTER (WHERE outcome <> 'up'),
           count(*),
           array_agg(region ORDER BY region) FILTER (WHERE outcome <> 'up'),
           array_agg(DISTINCT outcome) FILTER (WHERE outcome <> 'up')
      FROM latest_results
     WHERE started_at >= now() - within
     GROUP BY target_id
    HAVING count(*) FILTER (WHERE outcome <> 'up') >= min_regions
     ORDER BY target_id
$$;

CREATE VIEW failing_targets AS SELECT * FROM failing_targets();

-- (d) Certificates expiring soonest (as last seen from any region).
CREATE VIEW cert_expiry AS
SELECT target_id, min(cert_not_after) AS not_after, min(cert_not_after) - now() AS remaining,
       array_agg(region ORDER BY region) AS seen_from
  FROM latest_results
 WHERE cert_not_after IS NOT NULL
 GROUP BY target_id
 ORDER BY not_after;
