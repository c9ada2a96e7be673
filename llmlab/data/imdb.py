"""IMDB, the Large Movie Review Dataset v1.0, read directly from its published formats.

Reference: A. L. Maas, R. E. Daly, P. T. Pham, D. Huang, A. Y. Ng, C. Potts, "Learning Word Vectors for
Sentiment Analysis", ACL 2011; https://ai.stanford.edu/~amaas/data/sentiment/. 25000 train + 25000 test
reviews, 12500 negative (star rating <= 4 of 10) and 12500 positive (>= 7) in each split; the train and test
sets cover disjoint movies (at most 30 reviews a movie). The 50000 unlabelled `unsup/` reviews and the
bag-of-words `*.feat` files are not used.

Accepted layouts, searched under the data root in `imdb/` and then in the root itself, in this order (the
first found is used; all give the same reviews, in the same order):
1. the extracted folder `aclImdb/` (`train|test/pos|neg/<id>_<rating>.txt`), or a folder that is itself such
   a tree (holds `train/pos/` ... `test/neg/`);
2. the official tarball `aclImdb_v1.tar.gz`, streamed with tarfile, never extracted to disk. Stanford
   publishes no checksum for it; its size (84125825 bytes) and sha256 (c40f74a1...) are the values that
   Hugging Face datasets (dataset_infos) and other loaders record for the file and verify downloads against
   (torchtext checks md5 7c2ac02c03563afcf9b574c7e56c153a);
3. the lab's JSONL copy `train.jsonl[.gz]` and `test.jsonl[.gz]`, lines
   `{"id": "<id>_<rating>", "label": 0|1, "rating": 1-10, "text": ...}` (text unchanged from the files),
   verified by the sha256 of the decompressed content (the MANIFEST lists the sha256 of the .gz files:
   `JSONL_GZ_SHA256`).
4. Hugging Face `datasets.load_dataset("imdb")`, only when asked for (`load_imdb(layout="hf")`): it needs
   the optional `datasets` package and internet, and it has no ids or ratings (`Review.id` is the index in
   the split, `Review.rating` is 0), so its order and splits differ from the local layouts'.

Reviews are sorted by label (negative first) and then numeric id, whatever the layout: the order of the JSONL
copy. Nothing is written under the data root (it may be read-only).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmlab.data.store import (
    DataMissingError,
    DatasetSpec,
    FileSpec,
    FileStatus,
    data_root_source,
    file_status,
    is_gzip,
    register_dataset,
    verify_file,
)

OFFICIAL_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
TARBALL = "aclImdb_v1.tar.gz"
FOLDER = "aclImdb"
SPLITS = ("train", "test")
CLASSES = ("neg", "pos")  # label 0, label 1
JSONL = {"train": "train.jsonl", "test": "test.jsonl"}
EXPECT_COUNTS = (12500, 12500)  # reviews per class in train and test
# sha256 of the lab's JSONL .gz files as listed in the shared data MANIFEST (the spec checks the decompressed
# content instead, so a re-compressed or plain copy verifies too).
JSONL_GZ_SHA256 = {
    "train": "55de01fe192c82aa17c8c6480a7011ff70e51179df49d61b6dead502b8300e8a",
    "test": "ba72ab6bcc42de94196600cf56d7ba69b345d07623bc4c2c5578abfbced65a38",
}

# Layout names (`Imdb.layout`, `ImdbSource.layout`) and how status and errors describe them.
LAYOUTS = {
    "folder": "extracted aclImdb folder",
    "tarball": "official tarball",
    "jsonl": "JSONL copy",
    "hf": "Hugging Face datasets",
}

# `[...]/train|test/pos|neg/<id>_<rating>.txt`, as a tar member name or a path below the folder.
_MEMBER = re.compile(r"(?:^|/)(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")
_FILE = re.compile(r"(\d+)_(\d+)\.txt$")
_ID = re.compile(r"(\d+)_(\d+)$")


# ---------------------------------------------------------------------------------------------------------
# Reviews and the dataset
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Review:
    text: str  # the file's content unchanged (UTF-8; `<br />` tags kept: see llmlab.data.text.clean_text)
    label: int  # 0 negative, 1 positive
    rating: int  # stars 1-10 (<= 4 negative, >= 7 positive); 0 when unknown (Hugging Face copy)
    id: str  # "<id>_<rating>" as in the file names (the index in the split for the Hugging Face copy)

    @property
    def number(self) -> int:
        """The numeric id (unique within a split and class)."""
        return int(self.id.split("_", 1)[0])


@dataclass
class Imdb:
    """IMDB's labelled reviews, each split sorted by label (negative first) then numeric id."""

    train: list[Review]
    test: list[Review]
    source: str  # the folder or file(s) read
    layout: str  # a key of LAYOUTS

    def description(self) -> str:
        def counts(rs: list[Review]) -> str:
            pos = sum(r.label for r in rs)
            return f"{len(rs)} ({len(rs) - pos} neg / {pos} pos)"

        return (
            f"IMDB Large Movie Review v1.0 (Maas et al. 2011), train {counts(self.train)} + test "
            f"{counts(self.test)} reviews, from the {LAYOUTS[self.layout]} {self.source}"
        )


def _sort_key(r: Review) -> tuple[int, int]:
    return (r.label, r.number)


def _make_review(text: str, label: int, number: int, rating: int) -> Review:
    return Review(text=text, label=label, rating=rating, id=f"{number}_{rating}")


# ---------------------------------------------------------------------------------------------------------
# Finding the source
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImdbSource:
    """Where IMDB was found: one of `LAYOUTS` and the folder or files it is read from."""

    layout: str  # a key of LAYOUTS
    path: Path  # the aclImdb folder, the tarball, or the JSONL train file
    test_path: Path | None = None  # the JSONL test file

    def describe(self) -> str:
        where = f"{self.path} + {self.test_path.name}" if self.test_path else str(self.path)
        return f"{LAYOUTS[self.layout]} {where}"


def _search_dirs(spec: DatasetSpec, root: Path) -> list[Path]:
    return [root / d for d in spec.subdirs] or [root]


def _is_review_tree(path: Path) -> bool:
    return all((path / s / c).is_dir() for s in SPLITS for c in CLASSES)


def _jsonl_file(folder: Path, split: str) -> Path | None:
    for name in (JSONL[split] + ".gz", JSONL[split]):
        if (folder / name).is_file():
            return folder / name
    return None


def find_imdb(root: str | Path | None = None, spec: DatasetSpec | None = None) -> ImdbSource | None:
    """The first accepted local layout under the data root (`root` > LLMLAB_DATA > ~/.cache/llmlab), or None.

    Order: an aclImdb folder, the official tarball, the JSONL copy (both files in one folder); each is looked
    for in `imdb/` and then in the root itself.
    """
    spec = spec or IMDB
    root_path = data_root_source(root)[0]
    for layout in ("folder", "tarball", "jsonl"):
        src = _find_layout(spec, root_path, layout)
        if src is not None:
            return src
    return None


def _find_layout(spec: DatasetSpec, root: Path, layout: str) -> ImdbSource | None:
    """The first source of one local layout, looked for in each search folder in order, or None."""
    for d in _search_dirs(spec, root):
        if layout == "folder":
            for path in (d / FOLDER, d):
                if _is_review_tree(path):
                    return ImdbSource("folder", path)
        elif layout == "tarball" and (d / TARBALL).is_file():
            return ImdbSource("tarball", d / TARBALL)
        elif layout == "jsonl":
            train, test = _jsonl_file(d, "train"), _jsonl_file(d, "test")
            if train is not None and test is not None:
                return ImdbSource("jsonl", train, test)
    return None


def _known_file(spec: DatasetSpec, name: str) -> FileSpec:
    for f in (*spec.files, *spec.alternatives):
        if f.name == name:
            return f
    return FileSpec(name, raw=name == TARBALL)  # not in this spec: found but not checked


def _source_files(spec: DatasetSpec, src: ImdbSource) -> list[tuple[Path, FileSpec]]:
    """The files of a source that have a checksum: what status reports and load verifies."""
    if src.layout == "tarball":
        return [(src.path, _known_file(spec, TARBALL))]
    if src.layout == "jsonl":
        assert src.test_path is not None
        return [
            (src.path, _known_file(spec, JSONL["train"])),
            (src.test_path, _known_file(spec, JSONL["test"])),
        ]
    return []


def _inspect(spec: DatasetSpec, root: Path, verify: bool) -> tuple[str, list[FileStatus]]:
    """`DatasetSpec.inspect` for `dataset_status`: the layout found and the state of its files."""
    src = find_imdb(root, spec)
    if src is None:
        # Half a JSONL copy is worth reporting as such ("partial"), rather than as a missing tarball.
        for d in _search_dirs(spec, root):
            found = {s: _jsonl_file(d, s) for s in SPLITS}
            if any(found.values()):
                files = [
                    file_status(found[s], _known_file(spec, JSONL[s]), spec.name, verify) for s in SPLITS
                ]
                return LAYOUTS["jsonl"] + ", incomplete", files
        return "", [file_status(None, f, spec.name, verify) for f in spec.files]
    if src.layout == "folder":
        return LAYOUTS["folder"], [FileStatus(f"{FOLDER}/{s}/", src.path / s, None) for s in SPLITS]
    return LAYOUTS[src.layout], [file_status(p, f, spec.name, verify) for p, f in _source_files(spec, src)]


def _check_tarball(fspec: FileSpec, path: Path) -> None:
    """`DatasetSpec.check_download`: the archive opens and holds 12500 reviews in each split and class."""
    counts = dict.fromkeys(((s, c) for s in SPLITS for c in CLASSES), 0)
    try:
        with tarfile.open(path, "r|*") as tf:
            for member in tf:
                m = _MEMBER.search(member.name) if member.isfile() else None
                if m:
                    counts[(m.group(1), m.group(2))] += 1
    except (OSError, EOFError, tarfile.TarError, zlib.error) as e:
        raise ValueError(f"{fspec.name} does not open as a tar archive: {e}") from e
    expected = {k: EXPECT_COUNTS[SPLITS.index(k[0])] for k in counts}
    if counts != expected:
        found = ", ".join(f"{s}/{c}: {n}" for (s, c), n in counts.items())
        raise ValueError(f"{fspec.name} does not hold the expected aclImdb reviews ({found})")


IMDB = register_dataset(
    DatasetSpec(
        name="imdb",
        description="IMDB movie reviews (Maas et al. 2011), 25000 train + 25000 test, binary sentiment",
        # `imdb/` is llmlab's layout; the root itself is where an extracted aclImdb/ often lives.
        subdirs=("imdb", ""),
        files=(
            # Stanford publishes no checksum; this sha256 is the one HF datasets and others record.
            FileSpec(
                TARBALL,
                sha256="c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe",
                size=84125825,
                raw=True,
            ),
        ),
        alternatives=(
            # The lab's JSONL copy (MANIFEST section 3): sha256 and size of the decompressed content.
            FileSpec(
                JSONL["train"], "2b9ce8c4c216656c0ee4c13f54cc932a858e00ffee4eb306b238fe07875ca236", 34560970
            ),
            FileSpec(
                JSONL["test"], "a8a2edc62e7d67a62ba0e61cd621050b0d09ab6dfaa1e93668d5430582bf5984", 33779568
            ),
        ),
        mirrors=("https://ai.stanford.edu/~amaas/data/sentiment/",),
        homepage="https://ai.stanford.edu/~amaas/data/sentiment/",
        citation="A. L. Maas, R. E. Daly, P. T. Pham, D. Huang, A. Y. Ng, C. Potts, Learning Word Vectors "
        "for Sentiment Analysis, ACL 2011",
        license="no license stated; the README asks users to cite Maas et al. 2011",
        inspect=_inspect,
        check_download=_check_tarball,
    )
)


def _missing_error(spec: DatasetSpec, root: Path, root_source: str) -> DataMissingError:
    dirs = _search_dirs(spec, root)
    where = " then ".join(f"{d}/" for d in dirs)
    src = f" (from {root_source})" if root_source else ""
    lines = [
        f"dataset {spec.name!r}: no accepted layout found under the data root {root}{src}.",
        f"Accepted layouts, looked for in {where} (the first found is used):",
        f"  1. the extracted folder {FOLDER}/ (train|test/pos|neg/<id>_<rating>.txt)",
        f"  2. the official tarball {TARBALL} (read as it is, sha256-verified)",
        f"  3. the JSONL copy {JSONL['train']}[.gz] and {JSONL['test']}[.gz] "
        '(lines {"id": "<id>_<rating>", "label": 0|1, "rating": 1-10, "text": ...})',
        '  4. Hugging Face datasets, only with load_imdb(layout="hf") (needs `pip install datasets` and '
        "internet)",
        f"Official source: {OFFICIAL_URL} (homepage {spec.homepage})",
        f"To fix: run `llmlab data status` to see what is found, then `llmlab data download {spec.name}` "
        f"(needs internet; writes {dirs[0]}/{TARBALL}), or put one of the layouts there by hand, "
        "or point LLMLAB_DATA (or --data-dir) at a folder that has it.",
    ]
    return DataMissingError("\n".join(lines), dataset=spec.name, missing=[TARBALL], root=root)


# ---------------------------------------------------------------------------------------------------------
# Reading each layout
# ---------------------------------------------------------------------------------------------------------


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"IMDB {where}: not UTF-8 text ({e})") from e


def _read_folder(path: Path) -> dict[str, list[Review]]:
    out: dict[str, list[Review]] = {s: [] for s in SPLITS}
    for split in SPLITS:
        for label, cls in enumerate(CLASSES):
            with os.scandir(path / split / cls) as it:
                for entry in it:
                    m = _FILE.fullmatch(entry.name)
                    if m is None or not entry.is_file():
                        continue  # e.g. .DS_Store
                    with open(entry.path, "rb") as f:
                        text = _decode(f.read(), entry.path)
                    out[split].append(_make_review(text, label, int(m.group(1)), int(m.group(2))))
    return out


def _read_tarball(path: Path) -> dict[str, list[Review]]:
    out: dict[str, list[Review]] = {s: [] for s in SPLITS}
    try:
        with tarfile.open(path, "r|*") as tf:
            for member in tf:
                m = _MEMBER.search(member.name) if member.isfile() else None
                if m is None:
                    continue  # unsup/, *.feat, urls_*.txt, imdb.vocab, README
                f = tf.extractfile(member)
                assert f is not None  # a regular file always has a stream
                text = _decode(f.read(), f"{path}:{member.name}")
                split, cls, number, rating = m.groups()
                out[split].append(_make_review(text, CLASSES.index(cls), int(number), int(rating)))
    except (OSError, EOFError, tarfile.TarError, zlib.error) as e:
        raise ValueError(f"IMDB official tarball {path}: damaged archive ({e})") from e
    return out


def _read_jsonl(path: Path, split: str) -> list[Review]:
    reviews = []
    opener = gzip.open if is_gzip(path) else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    m = _ID.fullmatch(row["id"])
                    if m is None:
                        raise ValueError(f"id {row['id']!r} is not <id>_<rating>")
                    if not isinstance(row["text"], str):
                        raise ValueError(f"text of {row['id']!r} is not a string")
                    review = Review(
                        text=row["text"], label=int(row["label"]), rating=int(row["rating"]), id=row["id"]
                    )
                    if int(m.group(2)) != review.rating:
                        raise ValueError(f"id {review.id!r} does not end in its rating {review.rating}")
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"IMDB JSONL {path} line {n}: {e}") from e
                reviews.append(review)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise ValueError(f"IMDB JSONL {path} ({split}): cannot read it ({e})") from e
    return reviews


def _read_hf() -> dict[str, list[Review]]:
    try:
        import datasets  # optional: not a dependency of llmlab
    except ImportError as e:
        raise DataMissingError(
            'IMDB from Hugging Face (layout="hf") needs the optional `datasets` package: `pip install '
            "datasets` (and internet on first use). Or use a local layout: run `llmlab data download imdb`, "
            f"or place {TARBALL} ({OFFICIAL_URL}) under the data root.",
            dataset="imdb",
        ) from e
    try:
        ds = datasets.load_dataset("imdb")
    except Exception as e:  # offline, hub errors, cache problems: all mean "not available from HF now"
        raise DataMissingError(
            f"IMDB from Hugging Face: datasets.load_dataset('imdb') failed ({type(e).__name__}: {e}). "
            "It needs internet on first use; offline, use a local layout (`llmlab data download imdb` "
            f"elsewhere, then copy {TARBALL} under the data root).",
            dataset="imdb",
        ) from e
    out: dict[str, list[Review]] = {}
    for split in SPLITS:
        rows = ds[split]
        # No ids or ratings in this copy: the index in the split stands in for the id, rating 0 = unknown.
        out[split] = [
            Review(text=text, label=int(label), rating=0, id=str(i))
            for i, (text, label) in enumerate(zip(rows["text"], rows["label"], strict=True))
        ]
    return out


def _read(src: ImdbSource) -> dict[str, list[Review]]:
    if src.layout == "folder":
        return _read_folder(src.path)
    if src.layout == "tarball":
        return _read_tarball(src.path)
    if src.layout == "jsonl":
        assert src.test_path is not None
        return {"train": _read_jsonl(src.path, "train"), "test": _read_jsonl(src.test_path, "test")}
    return _read_hf()


# ---------------------------------------------------------------------------------------------------------
# Checks and loading
# ---------------------------------------------------------------------------------------------------------


def _check_reviews(split: str, reviews: list[Review], where: str) -> None:
    """Labels, ratings and ids consistent (as the README states them); numeric ids unique per class."""
    seen: set[tuple[int, int]] = set()
    for r in reviews:
        if r.label not in (0, 1):
            raise ValueError(f"IMDB {split} from {where}: review {r.id} has label {r.label}, expected 0 or 1")
        if r.rating:  # 0: unknown (Hugging Face copy)
            if not (r.rating <= 4 if r.label == 0 else r.rating >= 7) or r.rating > 10:
                raise ValueError(
                    f"IMDB {split} from {where}: review {r.id} is {CLASSES[r.label]} with rating {r.rating}; "
                    "negative reviews have ratings 1-4 and positive ones 7-10"
                )
        key = (r.label, r.number)
        if key in seen:
            raise ValueError(
                f"IMDB {split} from {where}: {CLASSES[r.label]} review id {r.number} appears twice"
            )
        seen.add(key)


def _check_counts(data: Imdb, expect_counts: tuple[int, int]) -> None:
    for split, reviews, n in (("train", data.train, expect_counts[0]), ("test", data.test, expect_counts[1])):
        pos = sum(r.label for r in reviews)
        if (len(reviews) - pos, pos) != (n, n):
            raise ValueError(
                f"IMDB {split} from the {LAYOUTS[data.layout]} {data.source}: {len(reviews)} reviews "
                f"({len(reviews) - pos} neg, {pos} pos); expected {n} per class ({2 * n} in all). The copy "
                "is incomplete or not IMDB (to load a subset on purpose, pass expect_counts=None)."
            )


def load_imdb(
    root: str | Path | None = None,
    *,
    layout: str | None = None,
    verify: bool = True,
    expect_counts: tuple[int, int] | None = EXPECT_COUNTS,
    spec: DatasetSpec | None = None,
) -> Imdb:
    """IMDB's 25000 train and 25000 test reviews, each split sorted by label (negative first) then numeric id.

    Looks under the data root (`root` > LLMLAB_DATA > ~/.cache/llmlab) for the layouts listed in this module's
    docstring and raises DataMissingError naming them all when none is found. `layout` forces one ("folder",
    "tarball", "jsonl" or "hf"; None: the first found locally; "hf" is never chosen by itself). With
    `verify`, the source's files are checked against their known checksums (cached by the store, so only the
    first load hashes) and DataCorruptError is raised on a mismatch. `expect_counts` = reviews per class in
    (train, test), checked on every load (None skips it, for subsets). Label, rating and id consistency is
    always checked. `spec` replaces the registered IMDB spec (its checksums and search folders), e.g. in
    tests.
    """
    spec = spec or IMDB
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown IMDB layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if layout == "hf":
        src = ImdbSource("hf", Path("huggingface:imdb"))
    else:
        root_path, root_source = data_root_source(root)
        src = find_imdb(root_path, spec) if layout is None else _find_layout(spec, root_path, layout)
        if src is None:
            raise _missing_error(spec, root_path, root_source)
        if verify:
            for path, fspec in _source_files(spec, src):
                verify_file(path, fspec, spec.name)
    splits = _read(src)
    source = (
        str(src.path)
        if src.test_path is None
        else f"{src.path.parent}/{{{src.path.name},{src.test_path.name}}}"
    )
    data = Imdb(
        train=sorted(splits["train"], key=_sort_key),
        test=sorted(splits["test"], key=_sort_key),
        source=source,
        layout=src.layout,
    )
    for split in SPLITS:
        _check_reviews(split, getattr(data, split), data.source)
    if expect_counts is not None:
        _check_counts(data, expect_counts)
    return data


def train_val_split(reviews: Sequence[Review], val_size: int, seed: int) -> tuple[list[Review], list[Review]]:
    """A fixed, seeded, class-stratified split of `reviews` (the training set) into (train, validation).

    Each class gives `val_size` * (its share of `reviews`) reviews, rounded by largest remainder so the total
    is exactly `val_size`; which ones is a seeded permutation (numpy PCG64, the global RNG untouched). Both
    parts keep the input order. Note: IMDB's train and test sets have disjoint movies, but a random split of
    train does not (up to 30 reviews a movie), so validation accuracy may read slightly above test accuracy.
    """
    n = len(reviews)
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}) for {n} reviews, got {val_size}")
    labels = np.array([r.label for r in reviews], dtype=np.int64)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    exact = np.array([val_size * len(idx) / n for idx in by_class])
    take = np.floor(exact).astype(np.int64)
    # Largest remainder (ties: lower class first) hands out what flooring left.
    for k in sorted(range(len(classes)), key=lambda k: (-(exact[k] - take[k]), k))[
        : val_size - int(take.sum())
    ]:
        take[k] += 1
    rng = np.random.default_rng(seed)
    val_mask = np.zeros(n, dtype=bool)
    for idx, k in zip(by_class, take, strict=True):
        val_mask[rng.permutation(idx)[:k]] = True
    train = [r for r, v in zip(reviews, val_mask, strict=True) if not v]
    val = [r for r, v in zip(reviews, val_mask, strict=True) if v]
    return train, val
