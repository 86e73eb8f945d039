-- 0004: targets defined centrally (`vantage-ingester targets apply`) and the agent fleet (status
-- messages agents send on connect, every heartbeat, on stop, and as their MQTT last will).

-- Targets ----------------------------------------------------------------------------------------
-- `targets` so far only listed ids seen in results. A target applied from a targets file gets its
-- definition here; ids stay stable across renames and edits, and a target removed from the file
-- is retired (retired_at set), never deleted, so its history keeps its name.
ALTER TABLE targets
    ADD COLUMN name       text,
    ADD COLUMN url        text,
    ADD COLUMN spec       jsonb,        -- the target's table from the file, as applied
    ADD COLUMN regions    text[],       -- regions that probe it (NULL when pinned to agents)
    ADD COLUMN agents     text[],       -- 'region/agent' pins (NULL: every agent of its regions)
    ADD COLUMN created_at timestamptz,
    ADD COLUMN updated_at timestamptz,
    ADD COLUMN retired_at timestamptz;

-- One live target per name; retired ones may share a name with a later target.
CREATE UNIQUE INDEX targets_live_name ON targets (name) WHERE name IS NOT NULL AND retired_at IS NULL;

-- One row per `targets apply` that changed something; its number is the generation every set
-- published by that apply carries.
CREATE TABLE target_applies (
    generation  bigint PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    file        text NOT NULL,
    added       integer NOT NULL,
    changed     integer NOT NULL,
    retired     integer NOT NULL
);

-- The retained target sets as last published: one per region (agent = '') and one per agent
-- with pinned targets. A scope that disappears from the file is cleared on the broker and
-- deleted here.
CREATE TABLE target_sets (
    region       text NOT NULL,
    agent        text NOT NULL DEFAULT '',
    generation   bigint NOT NULL,
    target_ids   integer[] NOT NULL,
    bytes        integer NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (region, agent)
);

-- Fleet ------------------------------------------------------------------------------------------
-- `agents` so far only listed agents seen in results. Status messages fill in the rest.
ALTER TABLE agents
    ADD COLUMN version               text,
    ADD COLUMN boot_id               bigint,
    ADD COLUMN online                boolean NOT NULL DEFAULT false,
    ADD COLUMN state                 text,         -- online | heartbeat | offline | lost
    ADD COLUMN state_at              timestamptz,  -- when the agent (or the broker) said so
    ADD COLUMN last_seen             timestamptz,  -- latest status from the agent itself
    ADD COLUMN max_concurrency       integer,
    ADD COLUMN buffer_capacity       integer,
    ADD COLUMN targets               integer,
    ADD COLUMN pending_results       integer,
    ADD COLUMN region_set_generation bigint,
    ADD COLUMN agent_set_generation  bigint,
    ADD COLUMN rejected_scope        text,         -- the pushed set it refused, if any
    ADD COLUMN rejected_generation   bigint,
    ADD COLUMN rejection             text;

-- Agents with a verdict: `stale` when it claims to be online but its last status is older than
-- three default heartbeats (90 s). `vantage-ingester agents --stale-after` uses its own bound.
CREATE VIEW fleet AS
SELECT agent, region, version,
       CASE WHEN NOT online THEN 'offline'
            WHEN last_seen < now() - interval '90 seconds' THEN 'stale'
            ELSE 'online' END AS status,
       last_seen, first_seen, state, state_at, boot_id, targets, pending_results,
       region_set_generation, agent_set_generation, rejected_scope, rejected_generation, rejection
  FROM agents;
