"""bulk-migrate reading CSV columns as declared types (a mapping's cast, or the type of an existing
target column that travels as text) instead of inferring them. Real files, real embedded
PostgreSQL, real Prefect server, the real CLI in a subprocess."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import yaml

from flows.bulk_migrate import bulk_migrate
from tasks.errors import UserError
from tests.conftest import Server, run_cli, scratch_database

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture()
def target_db(pg: Server) -> Iterator[str]:
    with scratch_database(pg) as url:
        yield url


def _fetch(url: str, query: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchall()


@pytest.fixture()
def zips(tmp_path: Path) -> Path:
    """Zip codes that look like integers for more than pyarrow's first block (~1 MB) of rows,
    then one that does not; ``00123`` first."""
    data = tmp_path / "files"
    data.mkdir()
    lines = ["zip,city", "00123,Holtsville"] + [f"{10000 + i},Town {i}" for i in range(1, 80_000)]
    (data / "zips.csv").write_text("\n".join([*lines, "K1A0B1,Ottawa"]) + "\n")
    return data


def _zip_column(url: str, table: str = "zips") -> list[tuple]:
    return _fetch(
        url,
        f"SELECT format_type(atttypid, atttypmod), (SELECT count(*) FROM {table}), "  # noqa: S608 - test table
        f"(SELECT array_agg(zip ORDER BY zip) FROM {table} WHERE zip IN ('00123', 'K1A0B1')) "  # noqa: S608
        f"FROM pg_attribute WHERE attrelid = '{table}'::regclass AND attname = 'zip'",
    )


def test_csv_column_cast_to_text_is_read_as_written(target_db, zips):
    """A cast converted the inferred integer (00123 → 123), and the file failed at the first zip
    that was not one; a cast now declares the type the column is read as. The failed run created
    nothing (the file is read before any target table is), so the run with the cast that its
    message suggests creates the table with the declared type, not the inferred bigint."""
    with pytest.raises(UserError) as err:
        bulk_migrate(str(zips), target_db)
    message = str(err.value)
    assert "'K1A0B1'" in message and "(column zip)" in message and "cast: {zip: text}" in message
    assert "\n" not in message
    assert _fetch(target_db, "SELECT to_regclass('public.zips')") == [(None,)]

    report = bulk_migrate(
        str(zips), target_db, mapping={"zips": {"cast": {"zip": "text"}, "key": ["zip"]}}, chunk_rows=30_000
    )
    assert report["tables"][0]["rows"] == 80_001
    assert _zip_column(target_db) == [("text", 80_001, ["00123", "K1A0B1"])]


def test_csv_cast_under_a_rename_and_to_another_type(target_db, tmp_path):
    """A cast names the renamed column; a declared numeric reads every digit (a double would not)."""
    data = tmp_path / "files"
    data.mkdir()
    (data / "prices.csv").write_text("code,amount\n007,12345678901234.25\n042,0.10\n")
    mapping = {
        "prices": {"rename": {"code": "sku"}, "cast": {"sku": "varchar(8)", "amount": "numeric(20,2)"}}
    }
    bulk_migrate(str(data), target_db, mapping=mapping)
    assert _fetch(target_db, "SELECT sku, amount::text, pg_typeof(sku)::text FROM prices ORDER BY sku") == [
        ("007", "12345678901234.25", "character varying"),
        ("042", "0.10", "character varying"),
    ]


def test_existing_target_text_column_reads_the_csv_column_as_text(target_db, zips):
    """A seed into an existing table: its text column is the declaration (00123 loaded as 123)."""
    with psycopg.connect(target_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE zips (zip varchar(10) PRIMARY KEY, city text)")
    bulk_migrate(str(zips), target_db, mapping={"zips": {"key": ["zip"]}}, mode="seed")
    assert _zip_column(target_db) == [("character varying(10)", 80_001, ["00123", "K1A0B1"])]


@pytest.mark.parametrize(
    ("cast", "message"),
    [
        ({"zipp": "text"}, r"mapping for zips names unknown columns \['zipp'\]"),
        ({"zip": "zipcode"}, r"column zips\.zip has type 'zipcode', which the target does not know"),
    ],
)
def test_csv_cast_of_an_unknown_column_or_type_is_one_line(target_db, zips, cast, message):
    with pytest.raises(UserError, match=message) as err:
        bulk_migrate(str(zips), target_db, mapping={"zips": {"cast": cast}})
    assert "\n" not in str(err.value)


def test_cli_declares_csv_column_types_with_a_mapping_file(pg, target_db, zips, tmp_path):
    with scratch_database(pg) as other:
        failed = run_cli("bulk", "copy", str(zips), "--target", other, "--validate", "count")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("flowyard: error: ") and "(column zip)" in last and "cast: {zip: text}" in last

    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(yaml.safe_dump({"zips": {"cast": {"zip": "text"}}}))
    done = run_cli("bulk", "copy", str(zips), "--target", target_db, "--mapping", str(mapping))
    assert done.returncode == 0, done.stderr[-2000:]
    assert _zip_column(target_db) == [("text", 80_001, ["00123", "K1A0B1"])]
