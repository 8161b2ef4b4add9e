"""Prefect flows: one thin module per pipeline, composing tasks from ``tasks``."""
