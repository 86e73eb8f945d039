-- 0007 (issue #16): the alert stage's state. Incidents (one row per outage, per rule and
-- subject), the event log (every firing, update, flapping mark and resolution, each with the
-- idempotency key its webhook deliveries carry), the evaluator's counters, the webhook delivery
-- cursors, and the functions the evaluator reads through. The functions read only the public
-- SQL interface (latest_status, cert_expiry_by_region, fleet, gaps, targets' id/name/retired_at),
-- never the rollup tables, so that storage can change underneath them.

CREATE TABLE alert_incidents (
    incident_id  bigserial   PRIMARY KEY,
    rule         text        NOT NULL,            -- the rule's name (label alertname)
    kind         text        NOT NULL,            -- down | slow | cert_expiry | no_data | probe_stale | gaps
    subject      text        NOT NULL,            -- what it is about: a target id, a region, an agent
    target_id    integer,
    target_name  text,
    region       text,                            -- no_data, probe_stale, gaps
    agent        text,                            -- probe_stale, gaps
    severity     text        NOT NULL,
    -- Regions (agents for agent rules) involved when it opened, and every one involved since,
    -- each with what it saw last: {"eu-north": "connect_refused", ...}.
    opened_regions jsonb     NOT NULL,
    regions      jsonb       NOT NULL,
    reporting    integer,                         -- regions reporting when it opened
    summary      text        NOT NULL,            -- as it opened
    last_summary text        NOT NULL,            -- as it is now
    started_at   timestamptz NOT NULL,
    resolved_at  timestamptz,
    peak_regions integer     NOT NULL,            -- most regions involved at once
    peak_value   float8,                          -- slow: worst ms; cert_expiry: fewest days left
    flapping     boolean     NOT NULL DEFAULT false,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
-- At most one open incident per rule and subject.
CREATE UNIQUE INDEX alert_incidents_open ON alert_incidents (rule, subject) WHERE resolved_at IS NULL;
CREATE INDEX alert_incidents_target_time ON alert_incidents (target_id, started_at);
CREATE INDEX alert_incidents_resolved ON alert_incidents (resolved_at);

CREATE TABLE alert_events (
    event_id        bigserial   PRIMARY KEY,
    incident_id     bigint      NOT NULL REFERENCES alert_incidents,
    at              timestamptz NOT NULL DEFAULT now(),
    event           text        NOT NULL,          -- firing | updated | flapping | resolved
    regions         jsonb       NOT NULL,
    summary         text        NOT NULL,
    idempotency_key text        NOT NULL UNIQUE DEFAULT gen_random_uuid()::text
);
CREATE INDEX alert_events_incident ON alert_events (incident_id);

-- The evaluator's memory of subjects that are not idle (counting towards `for`, open, or with
-- bad verdicts in their flap history). Written in the same transaction as the incidents.
CREATE TABLE alert_rule_state (
    rule       text        NOT NULL,
    subject    text        NOT NULL,
    bad        integer     NOT NULL,
    good       integer     NOT NULL,
    history    text        NOT NULL,               -- recent verdicts, oldest first: B bad, G good
    flapping   boolean     NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (rule, subject)
);

-- Per webhook: the last event delivered (events are delivered in order, at least once).
CREATE TABLE alert_webhook_cursors (
    receiver          text PRIMARY KEY,
    delivered_through bigint NOT NULL,
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- `down` per target: regions reporting within `fresh` and those failing, with their outcomes
-- (aligned arrays, by region). Rows only for targets with a failing region or in `tracked` (the
-- subjects the evaluator remembers), so a quiet fleet costs one scan of latest_status and
-- returns nothing. target_ids / target_names NULL (both): every target; only_regions NULL:
-- every region.
CREATE FUNCTION vantage_alert_down(fresh interval, target_ids integer[], target_names text[],
                                   only_regions text[], tracked integer[])
    RETURNS TABLE (target_id integer, target_name text, retired boolean, reporting integer,
                   failing integer, failing_regions text[], failing_outcomes text[])
    LANGUAGE sql STABLE AS $$
    WITH chosen AS (
        SELECT t.target_id FROM targets AS t
         WHERE t.target_id = ANY (target_ids) OR t.name = ANY (target_names)
    ), sel AS (
        SELECT s.target_id, s.region, s.outcome, s.started_at
          FROM latest_status AS s
         WHERE (only_regions IS NULL OR s.region = ANY (only_regions))
           AND ((target_ids IS NULL AND target_names IS NULL)
                OR s.target_id IN (SELECT c.target_id FROM chosen AS c))
    ), candidates AS (
        -- Only targets failing somewhere (fresh) or remembered are aggregated: a quiet fleet
        -- costs one filtered scan, not a GROUP BY of every target.
        SELECT DISTINCT target_id FROM sel WHERE outcome <> 'up' AND started_at >= now() - fresh
        UNION
        SELECT unnest(tracked)
    ), per AS (
        SELECT s.target_id,
               count(*) FILTER (WHERE s.started_at >= now() - fresh)::integer AS reporting,
               count(*) FILTER (WHERE s.started_at >= now() - fresh AND s.outcome <> 'up')::integer AS failing,
               array_agg(s.region ORDER BY s.region)
                   FILTER (WHERE s.started_at >= now() - fresh AND s.outcome <> 'up') AS regions,
               array_agg(s.outcome ORDER BY s.region)
                   FILTER (WHERE s.started_at >= now() - fresh AND s.outcome <> 'up') AS outcomes
          FROM sel AS s JOIN candidates AS c USING (target_id)
         GROUP BY s.target_id
    )
    SELECT p.target_id, t.name, t.retired_at IS NOT NULL, p.reporting, p.failing,
           coalesce(p.regions, '{}'), coalesce(p.outcomes, '{}')
      FROM per AS p
      LEFT JOIN targets AS t USING (target_id)
     WHERE p.failing > 0 OR p.target_id = ANY (tracked)
$$;

-- `no_data` per region: when it last reported anything (within `forget`), and whether that is
-- fresh. A region with no fresh result for any target has stopped reporting.
CREATE FUNCTION vantage_alert_regions(fresh interval, forget interval, only_regions text[])
    RETURNS TABLE (region text, last_result timestamptz, fresh_targets integer, targets integer)
    LANGUAGE sql STABLE AS $$
    SELECT s.region, max(s.started_at),
           count(*) FILTER (WHERE s.started_at >= now() - fresh)::integer, count(*)::integer
      FROM latest_status AS s
     WHERE s.started_at >= now() - forget
       AND (only_regions IS NULL OR s.region = ANY (only_regions))
     GROUP BY s.region
$$;
