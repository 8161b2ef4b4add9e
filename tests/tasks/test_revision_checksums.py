"""Checksums of applied revision files live in the target database and catch edits."""

from __future__ import annotations

import psycopg

from tasks.revision_checksums import adopt, edited_revisions, file_checksum, forget, record, stored_checksums


def test_crlf_checkout_is_not_an_edit(tmp_path):
    unix, dos = tmp_path / "a.py", tmp_path / "b.py"
    unix.write_bytes(b"x = 1\ny = 2\n")
    dos.write_bytes(b"x = 1\r\ny = 2\r\n")
    assert file_checksum(unix) == file_checksum(dos)
    dos.write_bytes(b"x = 1\r\ny = 3\r\n")
    assert file_checksum(unix) != file_checksum(dos)


def test_record_adopt_detect_and_forget(fresh_db, tmp_path):
    first, second = tmp_path / "r1_one.py", tmp_path / "r2_two.py"
    first.write_text("one\n")
    second.write_text("two\n")
    with psycopg.connect(fresh_db) as conn:
        assert stored_checksums(conn) == {}
        assert conn.execute("SELECT to_regnamespace('flowyard')").fetchone() == (None,), (
            "reading creates nothing"
        )

    record(fresh_db, "r1", first, 0.5)
    assert adopt(fresh_db, [("r1", str(first)), ("r2", str(second))]) == ["r2"]
    assert adopt(fresh_db, [("r1", str(first)), ("r2", str(second))]) == []

    second.write_text("two, edited\n")
    with psycopg.connect(fresh_db) as conn:
        [edited] = edited_revisions(conn, [("r1", str(first)), ("r2", str(second))])
    assert edited.revision == "r2" and edited.filename == "r2_two.py"
    assert edited.describe().startswith("r2 (r2_two.py: recorded ")

    forget(fresh_db, "r2")
    with psycopg.connect(fresh_db) as conn:
        assert set(stored_checksums(conn)) == {"r1"}
        assert edited_revisions(conn, [("r1", str(first)), ("r2", str(second))]) == []
