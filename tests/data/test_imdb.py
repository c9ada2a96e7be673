"""IMDB: every local layout built small in tmp_path gives the same reviews; checks, errors, status, download
(over loopback), the stratified split; and the shared JSONL copy (LLMLAB_DATA), loaded once for the module."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import random
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from llmlab.data import imdb
from llmlab.data.imdb import (
    IMDB,
    JSONL_GZ_SHA256,
    OFFICIAL_URL,
    TARBALL,
    Review,
    find_imdb,
    load_imdb,
    train_val_split,
)
from llmlab.data.store import (
    DataCorruptError,
    DataDownloadError,
    DataMissingError,
    FileSpec,
    dataset_status,
    download_dataset,
    format_status,
)
from tests.conftest import _require_data
from tests.data.test_store import dead_url, serve

# (split, label, number, rating, text): numbers 9 and 10 check the numeric (not lexicographic) order.
SMALL = [
    ("train", 0, 10, 1, "Awful.<br /><br />Truly awful, don't watch it!"),
    ("train", 0, 9, 4, "Meh. Not “good”; café scenes were fine…"),
    ("train", 1, 3, 10, "Loved it!! A 10/10 classic."),
    ("train", 1, 0, 7, "Pretty good.\nSecond line."),
    ("test", 0, 2, 2, "Bad acting <br/>and worse plot?"),
    ("test", 1, 5, 8, "Great fun, well-made."),
]
SMALL_COUNTS = (2, 1)  # reviews per class in train and test


def _expected(split: str) -> list[Review]:
    rows = sorted((r for r in SMALL if r[0] == split), key=lambda r: (r[1], r[2]))
    return [Review(text=t, label=lab, rating=rat, id=f"{num}_{rat}") for _, lab, num, rat, t in rows]


def write_folder(top: Path, rows=SMALL) -> Path:
    """An aclImdb tree, with the files the loader must ignore (unsup/, *.feat, urls, vocab)."""
    for split, label, number, rating, text in rows:
        path = top / split / ("neg", "pos")[label] / f"{number}_{rating}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
    (top / "train" / "unsup").mkdir(parents=True, exist_ok=True)
    (top / "train" / "unsup" / "0_0.txt").write_text("unlabelled review")
    (top / "train" / "labeledBow.feat").write_text("7 0:1 1:2\n")
    (top / "train" / "urls_pos.txt").write_text("http://www.imdb.com/title/tt0000000/usercomments\n")
    (top / "imdb.vocab").write_text("the\nand\n")
    return top


def write_tarball(path: Path, folder: Path) -> Path:
    """`folder` as aclImdb/... in a .tar.gz, members in a shuffled order (the loader must sort)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    random.Random(0).shuffle(files)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for p in files:
            tf.add(p, arcname=f"aclImdb/{p.relative_to(folder).as_posix()}")
    return path


def write_jsonl(folder: Path, rows=SMALL, gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        lines = [
            json.dumps({"id": f"{num}_{rat}", "label": lab, "rating": rat, "text": t})
            for s, lab, num, rat, t in sorted(rows, key=lambda r: (r[1], r[2]))
            if s == split
        ]
        data = ("\n".join(lines) + "\n").encode("utf-8")
        if gz:
            (folder / f"{split}.jsonl.gz").write_bytes(gzip.compress(data, mtime=0))
        else:
            (folder / f"{split}.jsonl").write_bytes(data)
    return folder


def _load(root: Path, **kw) -> imdb.Imdb:
    return load_imdb(root, verify=False, expect_counts=SMALL_COUNTS, **kw)


# ---------------------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------------------


def test_every_layout_gives_the_same_reviews_in_the_same_order(tmp_path):
    folder_root = tmp_path / "a"
    write_folder(folder_root / "imdb" / "aclImdb")
    tar_root = tmp_path / "b"
    write_tarball(tar_root / "imdb" / TARBALL, write_folder(tmp_path / "scratch"))
    jsonl_root, plain_root = tmp_path / "c", tmp_path / "d"
    write_jsonl(jsonl_root / "imdb")
    write_jsonl(plain_root, gz=False)  # plain files, in the root itself
    loaded = {
        "folder": _load(folder_root),
        "tarball": _load(tar_root),
        "jsonl": _load(jsonl_root),
        "plain": _load(plain_root),
    }
    for name, data in loaded.items():
        assert data.train == _expected("train"), name
        assert data.test == _expected("test"), name
    assert [d.layout for d in loaded.values()] == ["folder", "tarball", "jsonl", "jsonl"]
    assert loaded["tarball"].source == str(tar_root / "imdb" / TARBALL)
    assert [r.id for r in loaded["folder"].train] == ["9_4", "10_1", "0_7", "3_10"]
    assert "<br />" in loaded["folder"].train[1].text  # the text is unchanged
    desc = loaded["jsonl"].description()
    assert "train 4 (2 neg / 2 pos)" in desc and "JSONL copy" in desc and "Maas" in desc


def test_search_order_and_forced_layout(tmp_path):
    write_jsonl(tmp_path / "imdb")
    assert find_imdb(tmp_path).layout == "jsonl"
    write_tarball(tmp_path / TARBALL, write_folder(tmp_path / "scratch"))
    assert find_imdb(tmp_path).layout == "tarball"
    write_folder(tmp_path / "aclImdb")
    assert find_imdb(tmp_path).layout == "folder"
    assert find_imdb(tmp_path).path == tmp_path / "aclImdb"
    assert _load(tmp_path, layout="jsonl").layout == "jsonl"
    assert _load(tmp_path, layout="tarball").layout == "tarball"
    with pytest.raises(ValueError, match="unknown IMDB layout"):
        _load(tmp_path, layout="csv")
    # a folder that is itself the aclImdb tree is accepted as the root
    assert find_imdb(tmp_path / "aclImdb").path == tmp_path / "aclImdb"


def test_counts_are_checked(tmp_path):
    write_jsonl(tmp_path)
    with pytest.raises(ValueError, match=r"expected 12500 per class .*expect_counts=None"):
        load_imdb(tmp_path, verify=False)
    assert len(load_imdb(tmp_path, verify=False, expect_counts=None).train) == 4


@pytest.mark.parametrize(
    "row, match",
    [
        (("train", 1, 4, 3, "pos with 3 stars"), "ratings 1-4 .* 7-10"),
        (("train", 0, 4, 11, "11 stars"), "ratings 1-4"),
        (("train", 0, 9, 2, "the same id again"), "appears twice"),
    ],
)
def test_inconsistent_reviews_are_refused(tmp_path, row, match):
    write_folder(tmp_path / "aclImdb", [*SMALL, row])
    with pytest.raises(ValueError, match=match):
        load_imdb(tmp_path, verify=False, expect_counts=None)


def test_bad_jsonl_lines_name_the_line(tmp_path):
    folder = write_jsonl(tmp_path, gz=False)
    lines = (folder / "train.jsonl").read_text().splitlines()
    lines[1] = json.dumps({"id": "9_3", "label": 0, "rating": 4, "text": "x"})
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl line 2: id '9_3' does not end in its rating 4"):
        load_imdb(tmp_path, verify=False, expect_counts=None)
    (folder / "train.jsonl").write_text('{"id": "1_1", "label": 0}\n')
    with pytest.raises(ValueError, match="line 1"):
        load_imdb(tmp_path, verify=False, expect_counts=None)


def test_damaged_tarball(tmp_path):
    tar = write_tarball(tmp_path / TARBALL, write_folder(tmp_path / "scratch"))
    tar.write_bytes(tar.read_bytes()[:200])
    with pytest.raises(ValueError, match="damaged archive"):
        load_imdb(tmp_path, verify=False, expect_counts=None)


def test_checksums_are_verified(tmp_path):
    write_jsonl(tmp_path / "imdb")
    with pytest.raises(DataCorruptError, match="sha256 of the decompressed content"):
        load_imdb(tmp_path, expect_counts=None)
    write_tarball(tmp_path / "imdb" / TARBALL, write_folder(tmp_path / "scratch"))
    with pytest.raises(DataCorruptError, match="sha256 of the file"):
        load_imdb(tmp_path, expect_counts=None)


def test_missing_data_error_names_layouts_url_and_command(tmp_path):
    with pytest.raises(DataMissingError) as info:
        load_imdb(tmp_path / "empty")
    msg = str(info.value)
    for part in ("aclImdb/", TARBALL, "train.jsonl", "test.jsonl", OFFICIAL_URL, "llmlab data download imdb"):
        assert part in msg, part
    assert str(tmp_path / "empty" / "imdb") in msg and 'layout="hf"' in msg
    assert info.value.dataset == "imdb"
    # a forced layout that is absent is missing too, even when another layout is there
    write_jsonl(tmp_path)
    with pytest.raises(DataMissingError):
        load_imdb(tmp_path, layout="folder")


def test_hugging_face_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(DataMissingError, match="pip install datasets"):
        load_imdb(layout="hf")


# ---------------------------------------------------------------------------------------------------------
# Status and download
# ---------------------------------------------------------------------------------------------------------


def test_status_reports_the_layout(tmp_path):
    st = dataset_status(IMDB, tmp_path / "none")
    assert st.state == "missing" and [f.name for f in st.files] == [TARBALL]
    write_jsonl(tmp_path / "j" / "imdb")
    (tmp_path / "j" / "imdb" / "test.jsonl.gz").unlink()
    st = dataset_status(IMDB, tmp_path / "j", verify=False)
    assert st.state == "partial" and "incomplete" in st.layout
    write_jsonl(tmp_path / "j" / "imdb")
    st = dataset_status(IMDB, tmp_path / "j")
    assert st.state == "corrupt" and st.layout == "JSONL copy"  # the tiny copy is not the real one
    write_folder(tmp_path / "f" / "aclImdb")
    st = dataset_status(IMDB, tmp_path / "f")
    assert st.state == "present" and st.layout == "extracted aclImdb folder"
    assert "extracted aclImdb folder" in format_status([st])


@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def _files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def test_download_checks_the_archive_over_loopback(tmp_path, no_proxy, monkeypatch):
    served = write_tarball(tmp_path / "served" / TARBALL, write_folder(tmp_path / "scratch"))
    sha = hashlib.sha256(served.read_bytes()).hexdigest()
    spec = dataclasses.replace(
        IMDB, files=(FileSpec(TARBALL, sha256=sha, size=served.stat().st_size, raw=True),)
    )
    root = tmp_path / "root"
    with serve(served.parent) as url:
        # the real sha256 does not match the fake: refused, nothing left behind
        with pytest.raises(DataDownloadError, match="sha256 of the file"):
            download_dataset("imdb", root, mirrors=[url], progress=False)
        # the checksum matches, but the archive holds 2+1 reviews a class, not 12500
        with pytest.raises(DataDownloadError, match="does not hold the expected aclImdb reviews"):
            download_dataset(spec, root, mirrors=[url], progress=False)
        assert _files_under(root) == []
        monkeypatch.setattr(imdb, "EXPECT_COUNTS", SMALL_COUNTS)
        assert download_dataset(spec, root, mirrors=[dead_url(), url], progress=False) == root / "imdb"
    assert _files_under(root) == [root / "imdb" / TARBALL]
    st = dataset_status(spec, root)
    assert st.state == "present" and st.layout == "official tarball" and st.files[0].ok
    data = load_imdb(root, spec=spec, expect_counts=SMALL_COUNTS)
    assert data.train == _expected("train") and data.layout == "tarball"


def test_download_refuses_a_file_that_is_not_a_tarball(tmp_path, no_proxy):
    served = tmp_path / "served" / TARBALL
    served.parent.mkdir()
    served.write_bytes(b"<html>not found</html>")
    spec = dataclasses.replace(IMDB, files=(FileSpec(TARBALL, raw=True),))  # no checksum: only the check
    with serve(served.parent) as url, pytest.raises(DataDownloadError, match="does not open as a tar"):
        download_dataset(spec, tmp_path / "root", mirrors=[url], progress=False)
    assert _files_under(tmp_path / "root") == []


def test_spec_registration():
    from llmlab.data import DATASETS

    assert DATASETS["imdb"] is IMDB
    f = IMDB.files[0]
    assert f.name == TARBALL and f.raw and f.size == 84125825
    assert IMDB.mirrors[0] + TARBALL == OFFICIAL_URL
    assert {a.name for a in IMDB.alternatives} == {"train.jsonl", "test.jsonl"}


# ---------------------------------------------------------------------------------------------------------
# Train/validation split
# ---------------------------------------------------------------------------------------------------------


def _reviews(n_neg: int, n_pos: int) -> list[Review]:
    return [Review(f"r{i}", 0, 1, f"{i}_1") for i in range(n_neg)] + [
        Review(f"r{i}", 1, 10, f"{i}_10") for i in range(n_pos)
    ]


def test_split_is_stratified_disjoint_and_seeded():
    reviews = _reviews(60, 40)
    train, val = train_val_split(reviews, 25, seed=0)
    assert len(val) == 25 and len(train) == 75
    assert Counter(r.label for r in val) == {0: 15, 1: 10}  # the classes' 60/40 shares
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(reviews)
    assert train == [r for r in reviews if r in set(train)]  # input order kept
    assert train_val_split(reviews, 25, seed=0) == (train, val)
    assert train_val_split(reviews, 25, seed=1)[1] != val
    # rounding by largest remainder still gives exactly val_size
    assert len(train_val_split(_reviews(7, 4), 5, seed=3)[1]) == 5
    assert train_val_split(reviews, 0, seed=0) == (reviews, [])
    with pytest.raises(ValueError, match="val_size"):
        train_val_split(reviews, 100, seed=0)


# ---------------------------------------------------------------------------------------------------------
# The shared JSONL copy (loaded once for the module: ~65 MB of text)
# ---------------------------------------------------------------------------------------------------------

_REAL: dict[str, object] = {}


def _snapshot(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.fixture
def real(shared_data):
    if "data" not in _REAL:
        if not (shared_data / "imdb" / "train.jsonl.gz").is_file():
            msg = f"no IMDB JSONL copy under {shared_data}"
            if _require_data():
                pytest.fail(msg + " but LLMLAB_REQUIRE_DATA=1")
            pytest.skip(msg)
        _REAL["before"] = _snapshot(shared_data)
        _REAL["data"] = load_imdb(shared_data)
        _REAL["after"] = _snapshot(shared_data)
    return _REAL


def test_real_counts_labels_and_order(real):
    data = real["data"]
    assert data.layout == "jsonl"
    for split in (data.train, data.test):
        assert len(split) == 25000
        assert Counter(r.label for r in split) == {0: 12500, 1: 12500}
        assert [(r.label, r.number) for r in split] == sorted((r.label, r.number) for r in split)
        assert all((r.rating <= 4) if r.label == 0 else (r.rating >= 7) for r in split)
        assert all(r.id == f"{r.number}_{r.rating}" for r in split)
        assert {r.number for r in split if r.label == 1} == set(range(12500))
    # the rating histogram the MANIFEST states for train
    ratings = Counter(r.rating for r in data.train)
    assert ratings == {1: 5100, 2: 2284, 3: 2420, 4: 2696, 7: 2496, 8: 3009, 9: 2263, 10: 4732}
    assert data.train[0].id == "0_3" and data.train[-1].id == "12499_7"
    assert data.train[0].text.startswith("Story of a man who has unnatural feelings for a pig.")


def test_real_data_root_is_not_written(real):
    assert real["after"] == real["before"]


def test_real_jsonl_files_match_the_manifest(shared_data, real):
    for split, sha in JSONL_GZ_SHA256.items():
        digest = hashlib.sha256((shared_data / "imdb" / f"{split}.jsonl.gz").read_bytes()).hexdigest()
        assert digest == sha


def test_real_split_is_balanced(real):
    train, val = train_val_split(real["data"].train, 5000, seed=0)
    assert len(train) == 20000 and Counter(r.label for r in val) == {0: 2500, 1: 2500}
    assert not {(r.label, r.number) for r in train} & {(r.label, r.number) for r in val}
