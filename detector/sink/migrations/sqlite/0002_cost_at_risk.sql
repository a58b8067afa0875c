-- Cost at risk (issue 11): the rate deck's price of the destination, the risk-weighted expected
-- cost of the callback, its currency, and the spend breaker of the tightest scope (JSON, for a
-- request the rules allowed). Older rows keep NULL / 0.
ALTER TABLE decisions ADD COLUMN cost_per_min REAL;
ALTER TABLE decisions ADD COLUMN expected_cost REAL NOT NULL DEFAULT 0;
ALTER TABLE decisions ADD COLUMN currency TEXT;
ALTER TABLE decisions ADD COLUMN budget TEXT;

-- Recreated like PostgreSQL's (SQLite expands d.* when it reads the view, but keep them alike).
DROP VIEW decision_log;
CREATE VIEW decision_log AS
SELECT d.*, o.outcome, o.ts AS outcome_ts, o.duration_s AS outcome_duration_s
FROM decisions d LEFT JOIN outcomes o ON o.request_id = d.request_id;
