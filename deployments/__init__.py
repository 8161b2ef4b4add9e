"""The ``flowyard`` CLI, deployment serving, schedules and Prefect API triggers."""
