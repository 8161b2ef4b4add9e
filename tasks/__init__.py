"""Retryable Prefect tasks and the shared flowyard runtime (settings, connections, embedded PostgreSQL)."""
