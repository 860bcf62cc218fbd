"""Store protocol and backends: the only code that speaks to a cache server."""
