-- Each alert with its dismissal, when there is one: from its dismissal record, else from its
-- full record. The same view poller query defines (poller/tables/query.py, ALERTS_LATEST).
CREATE OR REPLACE VIEW alerts_latest AS
SELECT
  a.id, a.created_at, a.title, a.severity,
  (a.is_dismissed OR d.id IS NOT NULL) AS is_dismissed,
  COALESCE(d.dismissed_at, a.dismissed_at) AS dismissed_at,
  COALESCE(d.dismiss_reason, a.dismiss_reason) AS dismiss_reason,
  COALESCE(d.dismiss_reason_text, a.dismiss_reason_text) AS dismiss_reason_text,
  COALESCE(d.dismissed_by, a.dismissed_by) AS dismissed_by,
  a.data_source, a.agent_id, a.rule_id, a.ruleset_id,
  a.record, a.key, d.record AS dismissal_record, d.key AS dismissal_key, a."date"
FROM alerts a
LEFT JOIN dismissals d ON d.id = a.id
