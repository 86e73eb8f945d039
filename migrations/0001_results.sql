-- 0001: one row per probe result, tagged with the region and agent the bridge took from the
-- authenticated MQTT topic. Applied by `vantage-ingester migrate` (and at sink start) inside the
-- configured schema; never edit this file after release: add a new one.

CREATE TABLE results (
    region      text        NOT NULL,
    agent       text        NOT NULL,
    boot_id     bigint      NOT NULL,  -- u64 on the wire, stored as its two's-complement i64
    seq         bigint      NOT NULL,
    target_id   integer     NOT NULL,  -- u32 on the wire; ids above 2^31 wrap to negative
    started_at  timestamptz NOT NULL,  -- probe start on the agent's clock (millisecond precision)
    status      smallint,              -- HTTP status; NULL when no response arrived
    outcome     text        NOT NULL,  -- vantage_proto::Outcome::as_str()
    regex_match boolean,               -- NULL: no regex configured
    total_us    integer     NOT NULL,
    dns_us      integer,
    connect_us  integer,
    tls_us      integer,
    ttfb_us     integer,
    body_bytes  integer     NOT NULL,
    ingested_at timestamptz NOT NULL DEFAULT now(),
    -- The natural key: a replayed result (MQTT or Kafka redelivery) hits it and is skipped.
    PRIMARY KEY (agent, boot_id, seq)
);

CREATE INDEX results_target_region_time ON results (target_id, region, started_at);
CREATE INDEX results_started_at ON results (started_at);
