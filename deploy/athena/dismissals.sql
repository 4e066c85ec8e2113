-- The dismissals query table: one row per alert whose archive shows a dismissal (its
-- dismissal record, or its full record when that is the dismissed version), partitioned by
-- the UTC day of dismissedAt. @LOCATION@ as in alerts.sql.
CREATE EXTERNAL TABLE IF NOT EXISTS dismissals (
  `id` string,
  `dismissed_at` timestamp,
  `dismiss_reason` string,
  `dismiss_reason_text` string,
  `dismissed_by` string,
  `record` string,
  `key` string
)
PARTITIONED BY (`date` string)
STORED AS PARQUET
LOCATION '@LOCATION@/dismissals/'
TBLPROPERTIES (
  'projection.enabled' = 'true',
  'projection.date.type' = 'date',
  'projection.date.format' = 'yyyy-MM-dd',
  'projection.date.range' = '2017-01-01,NOW',
  'projection.date.interval' = '1',
  'projection.date.interval.unit' = 'DAYS',
  'storage.location.template' = '@LOCATION@/dismissals/date=${date}/'
)
