"""Prefect flows: one thin module per pipeline, composing tasks from ``tasks``."""

import os
import sys
import warnings

from tasks.prefect_runtime import HEARTBEAT_ENV, HEARTBEAT_SECONDS, use_flowyard_api
from tasks.settings import get_settings

# A flow imported straight into Python (a script, a notebook) with no Prefect API configured
# would start Prefect's ephemeral server on SQLite, which gives "database is locked" under
# concurrent task runs. Point it at flowyard's server instead, as the CLI does; an API URL set in
# the environment wins, and the runs still heartbeat as flowyard's do unless the environment says
# otherwise: that URL may be flowyard's server, whose zombie automation would crash a live run
# beating at Prefect's default 180 s. Prefect fixes its settings when first imported, hence
# before any flow module imports it.
if "prefect" not in sys.modules:
    if "PREFECT_API_URL" in os.environ:
        os.environ.setdefault(HEARTBEAT_ENV, str(HEARTBEAT_SECONDS))
    else:
        use_flowyard_api(get_settings())

# Imported only now: Prefect reads its settings at import, and the API URL above must come first.
from tasks.flow_heartbeat import end_flows_without_heartbeat_wait  # noqa: E402

end_flows_without_heartbeat_wait()

# Prefect validates a flow's parameters through a pydantic model it generates from the
# signature. Parameter names the issues ask for (``validate``, ``schema``) shadow BaseModel
# attributes in that model, and pydantic warns about it at import and on every run. The model
# only validates, so the warning is noise on the user's console.
warnings.filterwarnings(
    "ignore",
    message=r'Field name "\w+" in "\w+Model" shadows an attribute in parent "ValidatedFunction',
    category=UserWarning,
)
