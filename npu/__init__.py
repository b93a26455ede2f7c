"""NPU runtime, detection and backends."""
