"""AG News (AG's news topic classification), read from its published CSV files.

Reference: X. Zhang, J. Zhao, Y. LeCun, "Character-level Convolutional Networks for Text Classification",
NeurIPS 2015 (the dataset's `readme.txt`). Four classes, World / Sports / Business / Sci/Tech (`classes.txt`,
class indices 1-4 in the files, labels 0-3 here), 30,000 training and 1,900 test articles per class.

Accepted layouts, looked for in `ag_news/`, `ag_news_csv/` and then the data root itself (the first folder
that holds `test.csv` is used, and `train.csv` / `classes.txt` are read from that same folder):
1. the official CSV files `train.csv`, `test.csv` (each also as `NAME.gz`) and `classes.txt`: rows
   `"class","title","description"`, no header, fields in double quotes, internal quotes doubled (RFC 4180);
2. Hugging Face `datasets.load_dataset("ag_news")`, only when asked for (`load_agnews(layout="hf")`): it needs
   the optional `datasets` package and internet on first use.

Text: `title + " " + description` (as the Hugging Face loader and most papers build it), with the backslash
escapes of the files undone. The readme says line breaks are escaped as `\\n`, but in the files (checked on
the 7,600 test rows) a line break of the source feed is a lone backslash (`a second\\team of rocketeers`), a
paragraph break is a double one (`...go on.\\\\What if...`), and `\\$` is a dollar sign (656 times: `\\$1
billion`). So: `\\$` -> `$`, `\\\\` -> newline, any other `\\` -> space. The HTML-entity remnants of the
source feed (` #39;` for an apostrophe, `&lt;`...) are part of the published text and kept as they are.

Where to get it: the CSV copy that torchtext and many loaders download,
https://github.com/mhjabreel/CharCnn_Keras/raw/master/data/ag_news_csv/ (train.csv, test.csv, classes.txt),
which is what `llmlab data download ag_news` fetches; the original distribution is the `ag_news_csv.tar.gz` of
Zhang's char-CNN data (Google Drive). No checksum is published by the authors. torchtext records md5s of the
mirror's files (`TORCHTEXT_MD5`); the lab's shared copy of test.csv (data MANIFEST, section 4) is one byte
shorter and does not match them, so nothing is enforced: downloads are checked by parsing (row and class
counts) and a loaded file is only *identified* (`identify_copy`): the mirror's file, the lab's known copy (the
MANIFEST's sha256 of its .gz, `SHARED_TEST_GZ_SHA256`), or an unverified copy. Nothing is written under the
data root."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from llmlab.data.store import (
    DataMissingError,
    DatasetSpec,
    FileSpec,
    data_root_source,
    is_gzip,
    register_dataset,
)

CLASSES = ("World", "Sports", "Business", "Sci/Tech")  # labels 0-3 (class indices 1-4 in the files)
AG_NEWS_CLASSES = CLASSES
SPLITS = ("train", "test")
CSV = {"train": "train.csv", "test": "test.csv"}
CLASSES_FILE = "classes.txt"
SUBDIRS = ("ag_news", "ag_news_csv", "")
MIRROR = "https://github.com/mhjabreel/CharCnn_Keras/raw/master/data/ag_news_csv/"
HF_NAME = "ag_news"
EXPECT_COUNTS = (30000, 1900)  # articles per class in train and test
# md5s torchtext records for the CharCnn_Keras mirror's plain files (not published by the authors).
TORCHTEXT_MD5 = {"train": "b1a00f826fdfbd249f79597b59e1dc12", "test": "d52ea96a97a2d943681189a97654912d"}
# The lab's shared copy of test.csv (MANIFEST section 4): sha256 of the .gz as listed there, and of its
# content.
SHARED_TEST_GZ_SHA256 = "aeced523c9dded81b7af91b049d13d0125e045f329faf39abeff8161bfbef8a4"
SHARED_TEST_CSV_SHA256 = "d2a2cef4dfeb21ca17b463fd15e9e5a639c05823d03efabb3d28a75bbfe8d915"
LAYOUTS = {"csv": "CSV files", "hf": "Hugging Face datasets"}


@dataclass(frozen=True, slots=True)
class Example:
    text: str  # title + " " + description, escapes undone (see the module docstring)
    label: int  # 0 World, 1 Sports, 2 Business, 3 Sci/Tech


@dataclass
class AgNews:
    """AG News in file order. `train` is None when only the test split is there (the lab's shared copy)."""

    train: list[Example] | None
    test: list[Example]
    classes: tuple[str, ...] = CLASSES
    source: str = ""  # the folder (or "huggingface:ag_news") read
    notes: list[str] = field(default_factory=list)

    def description(self) -> str:
        def counts(rows: list[Example] | None) -> str:
            if rows is None:
                return "not available"
            per = np.bincount([r.label for r in rows], minlength=len(self.classes))
            return f"{len(rows)} ({' / '.join(str(int(n)) for n in per)} per class)"

        return (
            f"AG News (Zhang et al. 2015), train {counts(self.train)}, test {counts(self.test)}, "
            f"from {self.source}"
        )


# ---------------------------------------------------------------------------------------------------------
# The spec (status and download)
# ---------------------------------------------------------------------------------------------------------


def _check_download(fspec: FileSpec, path: Path) -> None:
    """`DatasetSpec.check_download`: no checksum is published, so a downloaded file must at least parse."""
    if fspec.name == CLASSES_FILE:
        names = read_classes(path)
        if names != CLASSES:
            raise ValueError(f"{CLASSES_FILE} lists {names}, expected {CLASSES}")
        return
    split = "train" if fspec.name == CSV["train"] else "test"
    rows = read_csv(path)
    _check_counts(split, rows, EXPECT_COUNTS[SPLITS.index(split)], str(path))


AG_NEWS = register_dataset(
    DatasetSpec(
        name="ag_news",
        description="AG News topics (Zhang et al. 2015), 120000 train + 7600 test, 4 classes",
        subdirs=SUBDIRS,
        # No checksums: none is published (see the module docstring); downloads are checked by parsing.
        files=(
            FileSpec(CLASSES_FILE, url_name=CLASSES_FILE),
            FileSpec(CSV["test"], url_name=CSV["test"]),
            FileSpec(CSV["train"], url_name=CSV["train"]),
        ),
        alternatives=(FileSpec(CSV["test"], sha256=SHARED_TEST_CSV_SHA256, size=1857426),),
        mirrors=(MIRROR,),
        homepage="http://groups.di.unipi.it/~gulli/AG_corpus_of_news_articles.html",
        citation="X. Zhang, J. Zhao, Y. LeCun, Character-level Convolutional Networks for Text "
        "Classification, NeurIPS 2015",
        license="for research and non-commercial use (readme.txt of the dataset)",
        check_download=_check_download,
    )
)


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------

_ESCAPE = re.compile(r"\\\$|\\\\|\\")


def unescape(field_text: str) -> str:
    """Undo the files' backslash escapes: `\\$` -> `$`, `\\\\` -> newline, a lone `\\` -> space."""
    return _ESCAPE.sub(lambda m: {"\\$": "$", "\\\\": "\n"}.get(m.group(0), " "), field_text)


def _open_text(path: Path) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", newline="")


def read_csv(path: str | Path) -> list[Example]:
    """The rows of an AG News CSV file (plain or gzipped) as Examples, in file order."""
    path = Path(path)
    out = []
    try:
        with _open_text(path) as f:
            for n, row in enumerate(csv.reader(f, strict=True), 1):
                if not row:
                    continue
                if len(row) != 3:
                    raise ValueError(f"line {n}: {len(row)} fields, expected 3 (class, title, description)")
                cls, title, description = row
                if cls.strip() not in ("1", "2", "3", "4"):
                    raise ValueError(f"line {n}: class {cls!r}, expected 1-4")
                out.append(Example(unescape(title) + " " + unescape(description), int(cls) - 1))
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, csv.Error, ValueError) as e:
        raise ValueError(f"AG News CSV {path}: {e}") from e
    if not out:
        raise ValueError(f"AG News CSV {path}: no rows")
    return out


def read_classes(path: str | Path) -> tuple[str, ...]:
    """The class names of `classes.txt`, one a line (label i is line i + 1)."""
    with _open_text(Path(path)) as f:
        return tuple(line.strip() for line in f if line.strip())


def identify_copy(path: str | Path, split: str = "test") -> str:
    """Which known copy a CSV file is: the mirror's file (torchtext's md5), the lab's shared test.csv.gz (the
    MANIFEST's sha256), or neither (no checksum is published, so "unverified" is not an error)."""
    path = Path(path)
    data = path.read_bytes()
    content = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    if hashlib.md5(content, usedforsecurity=False).hexdigest() == TORCHTEXT_MD5.get(split):
        return f"the CharCnn_Keras mirror's {CSV[split]} (md5 {TORCHTEXT_MD5[split]} as torchtext records it)"
    if hashlib.sha256(data).hexdigest() == SHARED_TEST_GZ_SHA256:
        return (
            f"the lab's known copy of test.csv.gz (sha256 {SHARED_TEST_GZ_SHA256[:12]}…, MANIFEST section 4)"
        )
    if hashlib.sha256(content).hexdigest() == SHARED_TEST_CSV_SHA256:
        return f"the lab's known copy of test.csv (content sha256 {SHARED_TEST_CSV_SHA256[:12]}…), re-packed"
    return "an unverified copy (AG News publishes no checksum; the content parsed and its counts hold)"


def _csv_file(folder: Path, split: str) -> Path | None:
    for name in (CSV[split] + ".gz", CSV[split]):
        if (folder / name).is_file():
            return folder / name
    return None


def _search_dirs(root: Path) -> list[Path]:
    return [root / d if d else root for d in SUBDIRS]


def find_agnews(root: str | Path | None = None) -> dict[str, Path] | None:
    """{"test": path, and "train" / "classes" when present} of the first folder (`ag_news/`, `ag_news_csv/`,
    the root) that holds test.csv[.gz]; None when no folder does."""
    root_path = data_root_source(root)[0]
    for d in _search_dirs(root_path):
        test = _csv_file(d, "test")
        if test is None:
            continue
        found = {"test": test}
        train = _csv_file(d, "train")
        if train is not None:
            found["train"] = train
        if (d / CLASSES_FILE).is_file():
            found["classes"] = d / CLASSES_FILE
        return found
    return None


def _missing_error(root: Path, root_source: str) -> DataMissingError:
    src = f" (from {root_source})" if root_source else ""
    lines = [f"dataset 'ag_news': test.csv not found under the data root {root}{src}.", "Paths looked at:"]
    for d in _search_dirs(root):
        lines += [f"  {d / (CSV['test'] + '.gz')}", f"  {d / CSV['test']}"]
    lines += [
        f"Expected files (in one folder): {CSV['test']}[.gz] (required), {CSV['train']}[.gz] (for training "
        f'on the official split), {CLASSES_FILE}; rows "class","title","description", class 1-4, no header.',
        f"Source: {MIRROR}{{train.csv,test.csv,classes.txt}} (the CSV copy torchtext downloads; no checksum "
        'is published), or Hugging Face datasets with load_agnews(layout="hf") (`pip install datasets`, '
        "internet).",
        f"To fix: run `llmlab data status`, then `llmlab data download ag_news` (needs internet; writes "
        f"{root / SUBDIRS[0]}/), or put the files there by hand, or point LLMLAB_DATA (or --data-dir) at a "
        "folder that has them.",
    ]
    return DataMissingError("\n".join(lines), dataset="ag_news", missing=[CSV["test"]], root=root)


def _read_hf() -> dict[str, list[Example]]:
    try:
        import datasets  # optional: not a dependency of llmlab
    except ImportError as e:
        raise DataMissingError(
            'AG News from Hugging Face (layout="hf") needs the optional `datasets` package: `pip install '
            f"datasets` (and internet on first use). Or use the CSV files: `llmlab data download ag_news`, "
            f"or place train.csv/test.csv from {MIRROR} under the data root.",
            dataset="ag_news",
        ) from e
    try:
        ds = datasets.load_dataset(HF_NAME)
    except Exception as e:  # offline, hub errors, cache problems: all mean "not available from HF now"
        raise DataMissingError(
            f"AG News from Hugging Face: datasets.load_dataset({HF_NAME!r}) failed ({type(e).__name__}: "
            f"{e}). It needs internet on first use; offline, use the CSV files ({MIRROR}).",
            dataset="ag_news",
        ) from e
    # Its `text` is title + " " + description with the files' escapes kept; same labels 0-3, same order.
    return {
        split: [
            Example(unescape(t), int(y)) for t, y in zip(ds[split]["text"], ds[split]["label"], strict=True)
        ]
        for split in SPLITS
    }


def _check_counts(split: str, rows: Sequence[Example], per_class: int, where: str) -> None:
    counts = np.bincount([r.label for r in rows], minlength=len(CLASSES)).tolist()
    if counts != [per_class] * len(CLASSES):
        raise ValueError(
            f"AG News {split} from {where}: {len(rows)} rows, per class {counts}; expected {per_class} per "
            "class. The copy is incomplete or not AG News (to load a subset on purpose, pass "
            "expect_counts=None)."
        )


def load_agnews(
    root: str | Path | None = None,
    *,
    layout: str | None = None,
    expect_counts: tuple[int, int] | None = EXPECT_COUNTS,
) -> AgNews:
    """AG News from the data root (`root` > LLMLAB_DATA > ~/.cache/llmlab), each split in file order.

    `layout`: None or "csv" (the files; see the module docstring), or "hf" (Hugging Face datasets, never
    chosen by itself). A missing test.csv raises DataMissingError naming the paths looked at and the source; a
    missing train.csv gives `train=None` and a note (the lab's shared copy has only the test split).
    `expect_counts`: articles per class in (train, test), checked on every load (None skips it, for subsets).
    """
    if layout not in (None, *LAYOUTS):
        raise ValueError(f"unknown AG News layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    notes: list[str] = []
    if layout == "hf":
        splits: dict[str, list[Example] | None] = dict(_read_hf())
        classes, source = CLASSES, f"huggingface:{HF_NAME}"
    else:
        root_path, root_source = data_root_source(root)
        found = find_agnews(root_path)
        if found is None:
            raise _missing_error(root_path, root_source)
        source = str(found["test"].parent)
        splits = {"test": read_csv(found["test"]), "train": None}
        notes.append(f"test split: {identify_copy(found['test'], 'test')}.")
        if "train" in found:
            splits["train"] = read_csv(found["train"])
            notes.append(f"train split: {identify_copy(found['train'], 'train')}.")
        else:
            notes.append(
                f"train.csv is not in {source}/: only the official test split is available (the lab's shared "
                f"copy has no train split; get train.csv from {MIRROR} for the full dataset)."
            )
        classes = CLASSES
        if "classes" in found:
            classes = read_classes(found["classes"])
            if len(classes) != len(CLASSES):
                raise ValueError(f"{found['classes']} lists {len(classes)} classes, expected {len(CLASSES)}")
    if expect_counts is not None:
        for split, per_class in zip(SPLITS, expect_counts, strict=True):
            rows = splits[split]
            if rows is not None:
                _check_counts(split, rows, per_class, source)
    return AgNews(
        train=splits["train"], test=splits["test"] or [], classes=classes, source=source, notes=notes
    )


# ---------------------------------------------------------------------------------------------------------
# Carving parts out of one split
# ---------------------------------------------------------------------------------------------------------


class _Labelled(Protocol):
    @property
    def label(self) -> int: ...


T = TypeVar("T", bound=_Labelled)


def stratified_carve(examples: Sequence[T], sizes: Mapping[str, int | None], seed: int) -> dict[str, list[T]]:
    """Disjoint parts of `examples` with the given sizes (at most one None: all the rest), class-stratified.

    Each class's examples are put in a seeded random order (numpy PCG64; the global RNG untouched) and the
    classes are interleaved so that every prefix of the merged order holds each class in proportion (within
    one example); the parts are consecutive runs of that order, in the order of `sizes`. So a part's class
    counts are within two of exact proportions (exact for balanced classes and sizes divisible by the class
    count), and a part does not change when the sizes of later parts do. Each part keeps the input order."""
    n = len(examples)
    if sum(v is None for v in sizes.values()) > 1:
        raise ValueError("at most one part may take the rest (size None)")
    if any(v is not None and v < 0 for v in sizes.values()):
        raise ValueError(f"part sizes must be >= 0: {dict(sizes)}")
    fixed = sum(v for v in sizes.values() if v is not None)
    if fixed > n:
        raise ValueError(f"parts of {dict(sizes)} need {fixed} examples; only {n} are given")
    labels = np.array([e.label for e in examples], dtype=np.int64)
    rng = np.random.default_rng(seed)
    keys, order = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        keys.append((np.arange(len(idx)) + 0.5) / len(idx))  # fractional position within the class
        order.append(idx)
    key, idx = np.concatenate(keys), np.concatenate(order)
    merged = idx[np.argsort(key, kind="stable")]  # ties: lower class first
    parts: dict[str, list[T]] = {}
    start = 0
    for name, size in sizes.items():
        take = n - fixed if size is None else size
        chosen = np.sort(merged[start : start + take])
        parts[name] = [examples[i] for i in chosen]
        start += take
    return parts


def label_counts(rows: Sequence[Any], num_classes: int = len(CLASSES)) -> list[int]:
    """Examples per label (for descriptions and tests)."""
    return np.bincount([r.label for r in rows], minlength=num_classes).tolist()
