-- Decision log: one row per request id (idempotent upsert), its reasons in a child table, the
-- dialer's outcome in its own table, joined by request id in the decision_log view.
-- Times are epoch seconds. No raw IP anywhere; the number only as a keyed hash and a masked form
-- (number_e164 is filled only when DETECTOR_SINK_STORE_NUMBERS allows it).
CREATE TABLE decisions (
    request_id        TEXT PRIMARY KEY,
    decided_at        DOUBLE PRECISION NOT NULL,
    request_ts        DOUBLE PRECISION NOT NULL,
    action            TEXT NOT NULL,
    silent            BOOLEAN NOT NULL,
    risk              DOUBLE PRECISION NOT NULL,
    reasons           TEXT NOT NULL,  -- comma-separated, most important first (the child table indexes them)
    monitored_reasons TEXT NOT NULL,
    policy_version    TEXT NOT NULL,
    model_version     TEXT,
    number_hash       TEXT,
    number_masked     TEXT NOT NULL,
    number_e164       TEXT,
    number_country    TEXT,
    number_type       TEXT,
    ip_hash           TEXT NOT NULL,
    ip_country        TEXT,
    asn               BIGINT,
    enrichment        JSONB NOT NULL,
    counts            JSONB NOT NULL,
    model             JSONB,
    stored_at         DOUBLE PRECISION NOT NULL
);
CREATE INDEX decisions_decided_at ON decisions (decided_at);
CREATE INDEX decisions_number_hash ON decisions (number_hash, decided_at);
CREATE INDEX decisions_ip_hash ON decisions (ip_hash, decided_at);
CREATE INDEX decisions_action ON decisions (action, decided_at);

CREATE TABLE decision_reasons (
    request_id TEXT NOT NULL REFERENCES decisions (request_id) ON DELETE CASCADE,
    reason     TEXT NOT NULL,
    position   INTEGER NOT NULL,
    monitored  BOOLEAN NOT NULL,
    PRIMARY KEY (request_id, reason, monitored)
);
CREATE INDEX decision_reasons_reason ON decision_reasons (reason, request_id);

CREATE TABLE outcomes (
    request_id  TEXT PRIMARY KEY,
    outcome     TEXT NOT NULL,
    ts          DOUBLE PRECISION NOT NULL,
    duration_s  DOUBLE PRECISION NOT NULL,
    number_hash TEXT,
    stored_at   DOUBLE PRECISION NOT NULL
);
CREATE INDEX outcomes_ts ON outcomes (ts);

CREATE VIEW decision_log AS
SELECT d.*, o.outcome, o.ts AS outcome_ts, o.duration_s AS outcome_duration_s
FROM decisions d LEFT JOIN outcomes o ON o.request_id = d.request_id;
