"""Which tables a bulk run copies, resolved against a real SQLite source and the mapping."""

from __future__ import annotations

import sqlite3

import pytest

from tasks.bulk_tables import table_specs
from tasks.column_mapping import parse_mapping
from tasks.errors import UserError


def test_mapping_keyed_by_a_table_the_source_lacks_is_refused_not_ignored(tmp_path):
    """A misspelt table in the mapping used to be skipped silently: the table copied unmapped."""
    with sqlite3.connect(tmp_path / "app.db") as db:
        db.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, kind TEXT)")
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    url = f"sqlite:///{tmp_path / 'app.db'}"
    typo = parse_mapping({"ordrs": {"target": "orders_v2", "drop": ["kind"]}})
    with pytest.raises(UserError, match=r"mapping names tables the source does not have: \['ordrs'\]"):
        table_specs(url, None, typo, "public", "full", None)
    other = parse_mapping({"orders": {"target": "orders_v2", "drop": ["kind"]}})
    (spec,) = table_specs(url, ["users"], other, "public", "full", None)  # mapped table not selected: fine
    assert spec.target_label == "public.users"
