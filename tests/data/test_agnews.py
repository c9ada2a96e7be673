"""AG News: the CSV layouts built small in tmp_path, the escapes, errors, stratified carving, a download
checked by parsing (over loopback); and the shared test.csv.gz (LLMLAB_DATA), loaded once for the module."""

from __future__ import annotations

import csv
import gzip
import io
import sys
from pathlib import Path

import pytest

from llmlab.data.agnews import (
    AG_NEWS,
    CLASSES,
    MIRROR,
    SHARED_TEST_GZ_SHA256,
    Example,
    identify_copy,
    label_counts,
    load_agnews,
    read_csv,
    stratified_carve,
    unescape,
)
from llmlab.data.store import DataDownloadError, DataMissingError, dataset_status, download_dataset
from tests.data.test_store import serve

# (class 1-4, title, description): quotes, commas, and the three escapes of the real files.
ROWS = [
    ("3", "Wall St. Bears Claw Back", 'Short-sellers, Wall Street\'s "ultra-cynics", are back.'),
    ("1", "Talks end", "A second\\team of envoys\\\\Talks resume \\$5 later."),
    ("2", "Game on", "Fans cheer, again."),
    ("4", "New chip", "Faster\\, cheaper."),
]


def _csv_bytes(rows) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode()


def _write(folder: Path, *, train=True, gz_test=True, classes=True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = _csv_bytes(ROWS)
    if gz_test:
        (folder / "test.csv.gz").write_bytes(gzip.compress(data))
    else:
        (folder / "test.csv").write_bytes(data)
    if train:
        (folder / "train.csv").write_bytes(_csv_bytes(ROWS[::-1]))
    if classes:
        (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n")


def test_unescape_follows_the_files():
    assert unescape("a second\\team") == "a second team"  # a line break of the source feed
    assert unescape("on.\\\\What") == "on.\nWhat"  # a paragraph break
    assert unescape("for \\$1 billion, A\\$378m") == "for $1 billion, A$378m"
    assert unescape("2\\\\$ odd") == "2\n$ odd"  # `\\` is taken before `\$`
    assert unescape("no escapes") == "no escapes"


@pytest.mark.parametrize("subdir", ["ag_news", "ag_news_csv", ""])
def test_csv_layouts_read_title_and_description(tmp_path, subdir):
    _write(tmp_path / subdir if subdir else tmp_path)
    data = load_agnews(tmp_path, expect_counts=None)
    assert data.classes == CLASSES
    assert data.test[0] == Example(
        'Wall St. Bears Claw Back Short-sellers, Wall Street\'s "ultra-cynics", are back.', 2
    )
    assert data.test[1] == Example("Talks end A second team of envoys\nTalks resume $5 later.", 0)
    assert [e.label for e in data.test] == [2, 0, 1, 3]
    assert data.train == data.test[::-1]
    assert data.source == str(tmp_path / subdir if subdir else tmp_path)
    assert "unverified copy" in data.notes[0]


def test_missing_train_gives_none_and_a_note(tmp_path):
    _write(tmp_path / "ag_news", train=False, gz_test=False, classes=False)
    data = load_agnews(tmp_path, expect_counts=None)
    assert data.train is None and len(data.test) == 4 and data.classes == CLASSES
    assert "train.csv is not in" in data.notes[-1] and MIRROR in data.notes[-1]


def test_missing_test_names_files_and_source(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAB_DATA", str(tmp_path))
    (tmp_path / "ag_news").mkdir()
    (tmp_path / "ag_news" / "train.csv").write_bytes(_csv_bytes(ROWS))  # train alone is not enough
    with pytest.raises(DataMissingError) as info:
        load_agnews()
    msg = str(info.value)
    assert str(tmp_path / "ag_news" / "test.csv.gz") in msg and str(tmp_path / "test.csv") in msg
    assert "env LLMLAB_DATA" in msg and MIRROR in msg and "no checksum" in msg
    assert "llmlab data download ag_news" in msg


def test_bad_rows_and_counts_are_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(_csv_bytes([("1", "t", "d"), ("5", "t", "d")]))
    with pytest.raises(ValueError, match="line 2: class '5'"):
        read_csv(bad)
    bad.write_bytes(_csv_bytes([("1", "t")]))
    with pytest.raises(ValueError, match="line 1: 2 fields"):
        read_csv(bad)
    _write(tmp_path / "ag_news")
    with pytest.raises(ValueError, match="expected 1900 per class"):
        load_agnews(tmp_path, expect_counts=(1, 1900))


def test_hf_layout_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataMissingError, match="pip install datasets"):
        load_agnews(layout="hf")
    with pytest.raises(ValueError, match="unknown AG News layout"):
        load_agnews(layout="parquet")


def _rows(n_per_class: int, classes: int = 4) -> list[Example]:
    return [Example(f"{c}-{i}", c) for i in range(n_per_class) for c in range(classes)]


def test_stratified_carve_is_disjoint_seeded_and_stratified():
    rows = _rows(100)
    parts = stratified_carve(rows, {"train": 200, "val": 40, "test": None}, seed=3)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [200, 40, 160]
    texts = [set(e.text for e in parts[k]) for k in parts]
    assert sum(len(t) for t in texts) == len(set.union(*texts)) == 400  # disjoint, everything used
    assert label_counts(parts["train"]) == [50] * 4 and label_counts(parts["val"]) == [10] * 4
    assert parts == stratified_carve(rows, {"train": 200, "val": 40, "test": None}, seed=3)
    assert parts["train"] != stratified_carve(rows, {"train": 200, "val": 40, "test": None}, seed=4)["train"]
    # a part does not depend on the sizes of later parts; each keeps the input order
    assert stratified_carve(rows, {"train": 200, "val": 10}, seed=3)["train"] == parts["train"]
    assert [rows.index(e) for e in parts["val"]] == sorted(rows.index(e) for e in parts["val"])


def test_stratified_carve_of_unbalanced_classes_stays_proportional():
    rows = [Example(str(i), 0 if i < 300 else 1) for i in range(400)]  # 75% / 25%
    for size in (7, 50, 123):
        counts = label_counts(stratified_carve(rows, {"a": size}, seed=0)["a"], 2)
        assert abs(counts[0] - 0.75 * size) <= 1 and sum(counts) == size
    with pytest.raises(ValueError, match="at most one"):
        stratified_carve(rows, {"a": None, "b": None}, seed=0)
    with pytest.raises(ValueError, match="need 500"):
        stratified_carve(rows, {"a": 300, "b": 200}, seed=0)


# ------------------------------------------------------------------------------------------- real data
def test_shared_test_split(shared_data):
    data = load_agnews(shared_data)
    assert len(data.test) == 7600 and label_counts(data.test) == [1900] * 4
    assert data.classes == ("World", "Sports", "Business", "Sci/Tech")
    assert data.train is None and "train.csv is not in" in data.notes[-1]
    assert "known copy" in data.notes[0] and SHARED_TEST_GZ_SHA256[:12] in data.notes[0]
    # escapes undone: no backslash is left; the rocketeers line break and the dollar signs read as text
    assert not any("\\" in e.text for e in data.test)
    assert "A second team of rocketeers" in data.test[1].text and data.test[1].label == 3
    assert sum(e.text.count("$") for e in data.test) == 656  # every `\\$` of the file
    assert any("\n" in e.text for e in data.test)  # paragraph breaks
    assert data.test[0].text.startswith("Fears for T N pension after talks Unions representing workers")
    assert identify_copy(shared_data / "ag_news" / "test.csv.gz").startswith("the lab's known copy")


def test_status_of_the_shared_copy_is_partial(shared_data):
    st = dataset_status(AG_NEWS, shared_data)
    assert st.state == "partial"
    found = {f.name: f.path for f in st.files}
    assert found["test.csv"] == shared_data / "ag_news" / "test.csv.gz" and found["train.csv"] is None


def test_download_is_checked_by_parsing(shared_data, tmp_path, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # keep loopback traffic off any proxy
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    served = tmp_path / "served"
    served.mkdir()
    (served / "test.csv").write_bytes(gzip.decompress((shared_data / "ag_news" / "test.csv.gz").read_bytes()))
    (served / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (served / "train.csv").write_bytes(_csv_bytes(ROWS))  # parses, but is not 120,000 articles
    root = tmp_path / "root"
    with serve(served) as url, pytest.raises(DataDownloadError, match="expected 30000 per class"):
        download_dataset(AG_NEWS, root, mirrors=[url], progress=False)
    assert sorted(p.name for p in (root / "ag_news").iterdir()) == ["classes.txt", "test.csv"]
    data = load_agnews(root)
    assert len(data.test) == 7600 and data.train is None
