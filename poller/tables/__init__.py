"""The query tables (SPEC "Query tables"): daily Parquet parts of the archive under
``P/tables/``, built from the archive alone through the bucket side's interfaces, and
``poller query`` over them with DuckDB. Nothing here imports the API side."""
