-- Cost at risk (issue 11): the rate deck's price of the destination, the risk-weighted expected
-- cost of the callback, its currency, and the spend breaker of the tightest scope (JSON, for a
-- request the rules allowed). Older rows keep NULL / 0.
ALTER TABLE decisions ADD COLUMN cost_per_min DOUBLE PRECISION;
ALTER TABLE decisions ADD COLUMN expected_cost DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE decisions ADD COLUMN currency TEXT;
ALTER TABLE decisions ADD COLUMN budget JSONB;

-- PostgreSQL expands d.* when a view is created: recreate the view to include the new columns.
DROP VIEW decision_log;
CREATE VIEW decision_log AS
SELECT d.*, o.outcome, o.ts AS outcome_ts, o.duration_s AS outcome_duration_s
FROM decisions d LEFT JOIN outcomes o ON o.request_id = d.request_id;
