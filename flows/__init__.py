"""Prefect flows: one thin module per pipeline, composing tasks from ``tasks``."""

import warnings

# Prefect validates a flow's parameters through a pydantic model it generates from the
# signature. Parameter names the issues ask for (``validate``, ``schema``) shadow BaseModel
# attributes in that model, and pydantic warns about it at import and on every run. The model
# only validates, so the warning is noise on the user's console.
warnings.filterwarnings(
    "ignore",
    message=r'Field name "\w+" in "\w+Model" shadows an attribute in parent "ValidatedFunction',
    category=UserWarning,
)
