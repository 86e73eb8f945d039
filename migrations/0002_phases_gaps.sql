-- 0002: wire format v2. Where a failed probe stopped, body transfer time, truncation,
-- redirects, certificate expiry and the address used; and the agents' gap records (results an
-- agent dropped when its buffer overflowed), so that loss is visible in SQL.

ALTER TABLE results
    ADD COLUMN failed_phase   text,                           -- vantage_proto::Phase::as_str()
    ADD COLUMN transfer_us    integer,
    ADD COLUMN body_truncated boolean  NOT NULL DEFAULT false,
    ADD COLUMN redirects      smallint NOT NULL DEFAULT 0,
    ADD COLUMN cert_not_after timestamptz,                    -- leaf certificate notAfter
    ADD COLUMN remote_ip      inet;

CREATE TABLE gaps (
    region           text        NOT NULL,
    agent            text        NOT NULL,
    boot_id          bigint      NOT NULL,
    first_seq        bigint      NOT NULL,  -- the dropped results had seq first_seq .. first_seq + dropped - 1
    dropped          integer     NOT NULL,
    first_started_at timestamptz NOT NULL,
    last_started_at  timestamptz NOT NULL,
    ingested_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent, boot_id, first_seq)
);

CREATE INDEX gaps_time ON gaps (first_started_at);
