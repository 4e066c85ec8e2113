-- The alerts query table (SPEC "Query tables"): one row per alert, partitioned by the UTC
-- day of creation. Replace @LOCATION@ with s3://BUCKET/PREFIX/tables (no trailing slash;
-- without a prefix: s3://BUCKET/tables). Partition projection finds the days: no crawler,
-- no MSCK REPAIR. Timestamps are UTC.
CREATE EXTERNAL TABLE IF NOT EXISTS alerts (
  `id` string,
  `created_at` timestamp,
  `title` string,
  `severity` int,
  `is_dismissed` boolean,
  `dismissed_at` timestamp,
  `dismiss_reason` string,
  `dismiss_reason_text` string,
  `dismissed_by` string,
  `data_source` string,
  `agent_id` string,
  `rule_id` string,
  `ruleset_id` string,
  `record` string,
  `key` string
)
PARTITIONED BY (`date` string)
STORED AS PARQUET
LOCATION '@LOCATION@/alerts/'
TBLPROPERTIES (
  'projection.enabled' = 'true',
  'projection.date.type' = 'date',
  'projection.date.format' = 'yyyy-MM-dd',
  'projection.date.range' = '2017-01-01,NOW',
  'projection.date.interval' = '1',
  'projection.date.interval.unit' = 'DAYS',
  'storage.location.template' = '@LOCATION@/alerts/date=${date}/'
)
