"""Atomic writes: the target holds the old or the new content, and no temporary file is left behind."""

from __future__ import annotations

import pytest

from llmlab.fileio import atomic_path, atomic_write_text


def test_write_replaces_the_content(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_atomic_dir_replaces_a_folder_only_when_the_block_succeeds(tmp_path):
    from llmlab.fileio import atomic_dir

    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("killed mid-write")
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary folder left
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
