"""Parallel corpora for English<->German translation, read from their published files: Multi30k, IWSLT 2017.

A corpus is three splits ("train", "val", "test") of aligned raw lines, (sources, targets). Each line of a
file is one sentence: the line ending ("\\n" or "\\r\\n") and surrounding whitespace are stripped, empty
lines are kept (alignment matters; the caller decides what to drop). Lines are split on "\\n" only, never with
`str.splitlines` (which also splits on U+2028, U+0085, form feeds..., and would break the alignment). One
exception, for Multi30k: a last line that is empty in BOTH files is the file's end, not a sentence, and is
dropped (the WMT16 archives' train and val files end with a blank line; the cove/OpenNMT scripts delete it
with `sed '$ d'`). Both directions are served from the same files: the languages only pick which side is the
source. Nothing is written under the data root (it may be read-only).

Multi30k, Task 1 (D. Elliott, S. Frank, K. Sima'an, L. Specia, "Multi30K: Multilingual English-German Image
Descriptions", VL 2016; https://github.com/multi30k/dataset): one English caption of a Flickr30k image and its
German translation. Accepted layouts, searched under the data root in `multi30k/raw/`, `multi30k/`,
`multi30k/data/task1/raw/`, then the root itself:
1. "raw": the files of the official repository's `data/task1/raw/`, `{train,val,TEST}.{en,de}`, each gzipped
   (`NAME.gz`, as the repository stores them) or plain; each file is looked for in those folders in order
   (.gz first). TEST is `test_2016_flickr` (the usual test set) or, when its files are present,
   `test_2017_flickr`, `test_2017_mscoco` or `test_2018_flickr`. Every file is verified by the sha256 of its
   decompressed content; the digests were computed from the repository at commit a3d2e0d2 (the lab's copy
   comes from it). `llmlab data download multi30k` fetches train, val and test_2016_flickr from
   raw.githubusercontent.com (the URLs torchtext's experimental Multi30k used).
2. "archives": the WMT16 multimodal-task archives that torchtext's `Multi30k` downloads, read with tarfile
   in place: `training.tar.gz` (members train.en, train.de), `validation.tar.gz` (val.en, val.de) and
   `mmt16_task1_test.tar.gz` (test.en, test.de: the 2016 test set; only that one). torchtext
   (torchtext/datasets/multi30k.py) fetches them from http://www.quest.dcs.shef.ac.uk/wmt16_files_mmt/
   (offline since 2022) and checks their sha256 (its `MD5` dict holds sha256 digests, `hash_type="sha256"`),
   which this module checks too: training 20140d01..., validation a7aa20e9..., test 0681be16.... The copy
   at github.com/neychev/small_DL_repo (datasets/Multi30k/, the mirror named in pytorch/text issue #1756)
   has the same training and validation archives; its test archive is repacked (sha256 6d1ca1db..., macOS
   `._test.*` entries and a test.fr added), with test.en/test.de byte-identical to the repository's
   test_2016_flickr files, and is accepted too. Measured on those archives: the train and val files end
   with a blank line (29001 and 1015 lines; dropped, see above), and val.de differs from the repository's
   corrected val.de in 61 of 1014 lines (train and test are the same text).

IWSLT 2017 (M. Cettolo, M. Federico, L. Bentivogli, J. Niehues, S. Stueker, K. Sudoh, K. Yoshino,
C. Federmann, "Overview of the IWSLT 2017 Evaluation Campaign", IWSLT 2017; data from WIT3, Cettolo et al.
EAMT 2012), TED talks, en-de. The WIT3 archive `en-de.tgz` (https://wit3.fbk.eu/2017-01, 2017-01-trnted/
texts/en/de/), also in the Hugging Face repository IWSLT/iwslt2017 (`data/2017-01-trnted/texts/en/de/`:
`en-de.tgz` at revision ebd7c60d, `en-de.zip` later), holds `en-de/` with
- `train.tags.en-de.en` / `.de`: one segment a line, talk by talk, with metadata lines (`<url>`, `<talkid>`,
  `<title>`, `<description>`, `<keywords>`, `<speaker>`, `<reviewer>`, `<translator>`, ...). They are
  filtered as the Hugging Face script iwslt2017.py does: a line pair is dropped when the English line,
  stripped, starts with "<". Alignment is checked: the German line of a dropped pair must start with "<"
  too, and a kept German line must not be a metadata line.
- `IWSLT17.TED.{dev2010,tst2010,...,tst2015}.en-de.{en,de}.xml`: `<doc docid=...>` elements holding
  `<seg id="N"> text </seg>`; segments are parsed with a regex (a segment may span lines; attributes in any
  order and quoting), XML entities are unescaped, and both sides must have the same (docid, seg id)
  sequence.
Splits as in the Hugging Face script: train = train.tags, val = dev2010; its test split is tst2010...tst2015
concatenated in year order (8079 pairs for en-de in its dataset_infos, with 206112 train and 888 validation),
offered here as test_set="tst2010-2015"; the default test set is tst2010 alone. Accepted layouts, searched
under `iwslt2017/`, `iwslt/`, then the root, in this order: the extracted folder `en-de/` (or a folder that
itself holds train.tags.en-de.en), the archive `en-de.tgz`, the archive `en-de.zip` (both read in place), and
Hugging Face `datasets` ("hf", see `load_iwslt2017`). WIT3 publishes no checksum, so local files are found and
parsed but not verified; the one digest known offline is the sha256 Hugging Face records for its en-de.tgz at
revision ebd7c60d (dataset_infos.json: 623caec6..., 16751364 bytes). `llmlab data download iwslt2017`
fetches that file and verifies it; a local en-de.tgz with that digest is reported as checked, another copy is
read without verification (noted in `ParallelCorpus.notes`).
"""

from __future__ import annotations

import os
import re
import tarfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llmlab.data.store import (
    DataCorruptError,
    DataMissingError,
    DatasetSpec,
    FileSpec,
    FileStatus,
    data_root_source,
    decode_utf8,
    file_status,
    find_file,
    open_maybe_gzip,
    register_dataset,
    verify_file,
)

SPLITS = ("train", "val", "test")
PAIRS = (("en", "de"), ("de", "en"))  # (source, target) language pairs served

MULTI30K_LAYOUTS = {"raw": "raw files", "archives": "WMT16 task-1 archives"}
IWSLT_LAYOUTS = {
    "folder": "extracted en-de folder",
    "tgz": "archive en-de.tgz",
    "zip": "archive en-de.zip",
    "hf": "Hugging Face datasets",
}
LAYOUTS = {**MULTI30K_LAYOUTS, **IWSLT_LAYOUTS}  # `ParallelCorpus.layout` is a key of this dict

_TITLE = {"multi30k": "Multi30k", "iwslt2017": "IWSLT 2017"}
_CITE = {"multi30k": "Elliott et al. 2016", "iwslt2017": "Cettolo et al. 2017"}


# ---------------------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ParallelCorpus:
    """Aligned raw lines of a translation corpus: `splits[split] = (sources, targets)`, line i with line i."""

    name: str  # "multi30k" | "iwslt2017"
    src_lang: str  # e.g. "en"
    tgt_lang: str  # e.g. "de"
    splits: dict[str, tuple[list[str], list[str]]]  # "train" / "val" / "test" -> (sources, targets)
    source: str  # the folder(s), the archive, or "Hugging Face datasets IWSLT/iwslt2017"
    layout: str  # a key of LAYOUTS
    test_name: str  # the test set's published name, e.g. "test_2016_flickr", "tst2010"
    notes: list[str] = field(default_factory=list)  # what was (not) verified, and how

    def pairs(self, split: str) -> list[tuple[str, str]]:
        """(source, target) pairs of one split."""
        src, tgt = self.splits[split]
        return list(zip(src, tgt, strict=True))

    def description(self) -> str:
        counts = " / ".join(
            f"{len(self.splits[s][0])} {self.test_name if s == 'test' else s}" for s in SPLITS
        )
        title = f"{_TITLE.get(self.name, self.name)} {self.src_lang}-{self.tgt_lang}"
        return f"{title} ({_CITE.get(self.name, '')}) from {_from_phrase(self.layout, self.source)}: {counts}"


def _from_phrase(layout: str, source: str) -> str:
    if layout in ("raw", "archives"):
        return f"the {LAYOUTS[layout]} in {source}"
    if layout == "hf":
        return source
    if layout in ("tgz", "zip"):
        return f"the archive {source}"
    return f"the {LAYOUTS.get(layout, layout)} {source}"


def _check_pair(dataset: str, src_lang: str, tgt_lang: str) -> None:
    if (src_lang, tgt_lang) not in PAIRS:
        supported = ", ".join(f"{s}-{t}" for s, t in PAIRS)
        raise ValueError(
            f"{_TITLE[dataset]}: unsupported language pair {src_lang}-{tgt_lang}; supported: {supported} "
            "(src_lang, tgt_lang)"
        )


# ---------------------------------------------------------------------------------------------------------
# Lines and alignment
# ---------------------------------------------------------------------------------------------------------


def _decode(data: bytes, where: str) -> str:
    return decode_utf8(
        data,
        where,
        "The file is damaged or not the official one; replace it with an official copy (`llmlab data "
        "status` shows what is found).",
    )


def split_lines(text: str) -> list[str]:
    """The lines of `text`, split on "\\n" only, each stripped ("\\r" and surrounding whitespace); empty lines
    kept; a final line ending does not start another line."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.strip() for line in lines]


def read_lines(path: str | Path) -> list[str]:
    """The stripped lines of a UTF-8 text file, gzipped (detected by magic bytes) or plain."""
    path = Path(path)
    try:
        with open_maybe_gzip(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # a broken gzip stream is a damaged file
        raise DataCorruptError(f"{path}: cannot read it ({e})", path=path) from e
    return split_lines(_decode(data, str(path)))


def _align(
    src: list[str], tgt: list[str], src_where: str, tgt_where: str, split: str
) -> tuple[list[str], list[str]]:
    if src and tgt and src[-1] == "" and tgt[-1] == "":
        src, tgt = src[:-1], tgt[:-1]  # a blank last line on both sides ends the file (WMT16 archives)
    if len(src) != len(tgt):
        raise DataCorruptError(
            f"{split} split: {src_where} has {len(src)} lines but {tgt_where} has {len(tgt)}; the two sides "
            "of a parallel corpus must align line by line. One of the files is damaged, truncated or from "
            "another release; replace both with an official copy.",
            path=src_where,
        )
    return src, tgt


def _orient(en: list[str], de: list[str], src_lang: str) -> tuple[list[str], list[str]]:
    return (en, de) if src_lang == "en" else (de, en)


# ---------------------------------------------------------------------------------------------------------
# Archives, read in place
# ---------------------------------------------------------------------------------------------------------


def _basename(member: str) -> str:
    return member.rstrip("/").rsplit("/", 1)[-1]


def _skip_member(member: str) -> bool:
    # macOS resource forks and metadata folders that archivers add next to the real files
    return _basename(member).startswith("._") or "__MACOSX/" in member


def _archive_members(path: Path, wanted) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of the regular files of a .tar[.gz] or .zip whose name `wanted(name)` accepts."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if not info.is_dir() and not _skip_member(info.filename) and wanted(info.filename):
                        yield info.filename, zf.read(info)
            return
        with tarfile.open(path, "r|*") as tf:  # streamed: one pass, nothing extracted to disk
            for member in tf:
                if member.isfile() and not _skip_member(member.name) and wanted(member.name):
                    f = tf.extractfile(member)
                    assert f is not None  # a regular file always has a stream
                    yield member.name, f.read()
    except (OSError, EOFError, zlib.error, tarfile.TarError, zipfile.BadZipFile) as e:
        raise DataCorruptError(
            f"{path}: damaged archive ({type(e).__name__}: {e}). Delete it and fetch it again, or replace it "
            "with an official copy.",
            path=path,
        ) from e


# ---------------------------------------------------------------------------------------------------------
# Multi30k: facts
# ---------------------------------------------------------------------------------------------------------

MULTI30K_REPO = "https://github.com/multi30k/dataset"
MULTI30K_MIRROR = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"
MULTI30K_TEST_SETS = ("test_2016_flickr", "test_2017_flickr", "test_2017_mscoco", "test_2018_flickr")
MULTI30K_DEFAULT_TEST = "test_2016_flickr"
MULTI30K_SUBDIRS = ("multi30k/raw", "multi30k", "multi30k/data/task1/raw", "")
# sha256, bytes and lines of the DECOMPRESSED files of data/task1/raw/ at commit a3d2e0d2 of multi30k/dataset.
MULTI30K_RAW: dict[str, tuple[str, int, int]] = {
    "train.en": ("460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6", 1801238, 29000),
    "train.de": ("2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72", 2110398, 29000),
    "val.en": ("1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227", 63297, 1014),
    "val.de": ("660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660", 75981, 1014),
    "test_2016_flickr.en": ("399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182", 62076, 1000),
    "test_2016_flickr.de": ("4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16", 70649, 1000),
    "test_2017_flickr.en": ("ce1450ddc5ab0834502579d77a170849952e15a2938b34cc503bdc25ebb4fb98", 55242, 1000),
    "test_2017_flickr.de": ("c3078bc3b36808bf9d20eb2347ed6137016179ef59ec0d2b9b8ecc3fb2880081", 64059, 1000),
    "test_2017_mscoco.en": ("43051fdfa86fd5395182e718a94ca67b1b227b9f7c79596ff0f6b813216981d2", 24949, 461),
    "test_2017_mscoco.de": ("58277df3c75f92f7145a11b910b553d1cf82c439249d4dc237c899609eafac22", 29906, 461),
    "test_2018_flickr.en": ("4e585c2dd525911a6ea7730e9d0b516239af3f1b1ffae6a2130223cfb639f25e", 70603, 1071),
    "test_2018_flickr.de": ("39fcc8b3331d76fb42d648d019c6898b0d5e58baac87bc2a0bb93f44ec8db207", 80893, 1071),
}
# The WMT16 archives, by split: file name, member stem (members `<stem>.en`, `<stem>.de`).
MULTI30K_ARCHIVES = {
    "train": ("training.tar.gz", "train"),
    "val": ("validation.tar.gz", "val"),
    "test": ("mmt16_task1_test.tar.gz", "test"),
}
MULTI30K_ARCHIVE_URL = "http://www.quest.dcs.shef.ac.uk/wmt16_files_mmt/"  # torchtext's; offline since 2022
# sha256 (and size, where measured) of the archives' bytes; the second test digest: the repacked mirror copy.
_ARCHIVE_SPECS = (
    FileSpec(
        "training.tar.gz",
        sha256="20140d013d05dd9a72dfde46478663ba05737ce983f478f960c1123c6671be5e",
        size=1207136,
        raw=True,
    ),
    FileSpec(
        "validation.tar.gz",
        sha256="a7aa20e9ebd5ba5adce7909498b94410996040857154dab029851af3a866da8c",
        size=46329,
        raw=True,
    ),
    FileSpec(
        "mmt16_task1_test.tar.gz",
        sha256="0681be16a532912288a91ddd573594fbdd57c0fbb81486eff7c55247e35326c2",
        raw=True,
    ),
    FileSpec(
        "mmt16_task1_test.tar.gz",
        sha256="6d1ca1dba99e2c5dd54cae1226ff11c2551e6ce63527ebb072a1f70f72a5cd36",
        size=67079,
        raw=True,
    ),
)


def _raw_spec(name: str) -> FileSpec:
    sha, size, _ = MULTI30K_RAW[name]
    return FileSpec(name, sha256=sha, size=size)


def _raw_names(test_set: str) -> list[str]:
    return [f"{stem}.{lang}" for stem in ("train", "val", test_set) for lang in ("en", "de")]


# ---------------------------------------------------------------------------------------------------------
# Multi30k: finding, status
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Multi30kSource:
    """Where Multi30k was found: `files` by canonical name ("train.en", ...) for "raw", by split for
    "archives"."""

    layout: str  # "raw" | "archives"
    files: dict[str, Path]
    test_set: str

    @property
    def where(self) -> str:
        folders = list(dict.fromkeys(str(p.parent) for p in self.files.values()))
        return folders[0] if len(folders) == 1 else ", ".join(folders)


def _search_dirs(spec: DatasetSpec, root: Path) -> list[Path]:
    return [root / d for d in spec.subdirs] or [root]


def _specs_named(spec: DatasetSpec, name: str) -> list[FileSpec]:
    return [f for f in (*spec.files, *spec.alternatives) if f.name == name]


def _known(spec: DatasetSpec, name: str, raw: bool = False) -> FileSpec:
    found = _specs_named(spec, name)
    return found[0] if found else FileSpec(name, raw=raw)  # not in this spec: found but not checked


def _find_raw(spec: DatasetSpec, root: Path, names: Sequence[str]) -> dict[str, Path | None]:
    return {n: find_file(spec, _known(spec, n), root) for n in names}


def _find_archives(spec: DatasetSpec, root: Path) -> dict[str, Path] | None:
    """The three archives, all in the first search folder that holds them all, or None."""
    for d in _search_dirs(spec, root):
        paths = {s: d / name for s, (name, _) in MULTI30K_ARCHIVES.items()}
        if all(p.is_file() for p in paths.values()):
            return paths
    return None


def _present_test_sets(spec: DatasetSpec, root: Path) -> list[str]:
    present = [t for t in MULTI30K_TEST_SETS if all(_find_raw(spec, root, [f"{t}.en", f"{t}.de"]).values())]
    if MULTI30K_DEFAULT_TEST not in present and _find_archives(spec, root) is not None:
        present.insert(0, MULTI30K_DEFAULT_TEST)
    return present


def find_multi30k(
    root: str | Path | None = None, test_set: str = MULTI30K_DEFAULT_TEST, spec: DatasetSpec | None = None
) -> Multi30kSource | None:
    """The first complete accepted layout under the data root (`root` > LLMLAB_DATA > ~/.cache/llmlab) for
    `test_set`, or None: the raw files (each looked for in every search folder), then the three archives in
    one folder (test_2016_flickr only)."""
    spec = spec or MULTI30K
    root_path = data_root_source(root)[0]
    raw = _find_raw(spec, root_path, _raw_names(test_set))
    if all(p is not None for p in raw.values()):
        return Multi30kSource("raw", {n: p for n, p in raw.items() if p is not None}, test_set)
    if test_set == MULTI30K_DEFAULT_TEST:
        archives = _find_archives(spec, root_path)
        if archives is not None:
            return Multi30kSource("archives", archives, test_set)
    return None


def _archive_status(spec: DatasetSpec, path: Path, verify: bool) -> FileStatus:
    """Checked against every known digest of that archive name (the test archive has two)."""
    statuses = [file_status(path, f, spec.name, verify) for f in _specs_named(spec, path.name)]
    if not statuses:
        return FileStatus(path.name, path, None)
    return next((s for s in statuses if s.ok), statuses[0])


def _inspect_multi30k(spec: DatasetSpec, root: Path, verify: bool) -> tuple[str, list[FileStatus]]:
    """`DatasetSpec.inspect` for `dataset_status`: the layout found and the state of its files."""
    main = {f.name: find_file(spec, f, root) for f in spec.files}
    extra = [
        (p, f)
        for f in spec.alternatives
        if not f.raw and f.name not in main and (p := find_file(spec, f, root)) is not None
    ]
    raw_statuses = [file_status(main[f.name], f, spec.name, verify) for f in spec.files] + [
        file_status(p, f, spec.name, verify) for p, f in extra
    ]
    archives = _find_archives(spec, root)
    raw_complete = all(p is not None for p in main.values())
    if archives is not None and not raw_complete:
        return MULTI30K_LAYOUTS["archives"], [_archive_status(spec, p, verify) for p in archives.values()]
    if any(p is not None for p in main.values()) or extra:
        return MULTI30K_LAYOUTS["raw"], raw_statuses
    for d in _search_dirs(spec, root):  # some archives, not all three: report those as "partial"
        paths = [d / name for name, _ in MULTI30K_ARCHIVES.values()]
        if any(p.is_file() for p in paths):
            statuses = [
                _archive_status(spec, p, verify) if p.is_file() else FileStatus(p.name, None, None)
                for p in paths
            ]
            return MULTI30K_LAYOUTS["archives"] + ", incomplete", statuses
    return "", raw_statuses


MULTI30K = register_dataset(
    DatasetSpec(
        name="multi30k",
        description="Multi30k En-De, Task 1 (Elliott et al. 2016), 29000 train / 1014 val / 1000 test pairs",
        subdirs=MULTI30K_SUBDIRS,
        # What `llmlab data download multi30k` fetches (as NAME.gz) and `llmlab data status` expects.
        files=tuple(_raw_spec(n) for n in _raw_names(MULTI30K_DEFAULT_TEST)),
        # The other test sets (checked when present, never downloaded) and the WMT16 archives.
        alternatives=(
            *(_raw_spec(n) for n in MULTI30K_RAW if n not in _raw_names(MULTI30K_DEFAULT_TEST)),
            *_ARCHIVE_SPECS,
        ),
        mirrors=(MULTI30K_MIRROR,),
        homepage=MULTI30K_REPO,
        citation="D. Elliott, S. Frank, K. Sima'an, L. Specia, Multi30K: Multilingual English-German Image "
        "Descriptions, Proceedings of the 5th Workshop on Vision and Language, 2016",
        license="no LICENSE file in the repository; its README asks users to cite Elliott et al. 2016",
        inspect=_inspect_multi30k,
        # No check_download: every downloaded file is verified by the sha256 of its decompressed content.
    )
)


def _multi30k_missing(spec: DatasetSpec, root: Path, root_source: str, test_set: str) -> DataMissingError:
    dirs = _search_dirs(spec, root)
    where = " then ".join(f"{d}/" for d in dirs)
    src = f" (from {root_source})" if root_source else ""
    names = _raw_names(test_set)
    found = _find_raw(spec, root, names)
    missing = [n for n in names if found[n] is None]
    archives = ", ".join(name for name, _ in MULTI30K_ARCHIVES.values())
    lines = [
        f"dataset {spec.name!r}: no complete accepted layout for test set {test_set} under the data root "
        f"{root}{src}.",
        f"Accepted layouts, looked for in {where} (the first complete one is used):",
        f"  1. the raw files of {MULTI30K_REPO} data/task1/raw/: {', '.join(names)}, each gzipped "
        "(NAME.gz) or plain (NAME)",
        f"  2. the WMT16 multimodal-task archives {archives}, all in one of those folders (read as they are, "
        "sha256-verified; test_2016_flickr only)",
        f"Missing raw files ({len(missing)} of {len(names)}), paths looked at, official source:",
    ]
    for n in missing:
        lines.append(f"  {n}:")
        lines += [f"    {d / name}" for d in dirs for name in (n + ".gz", n)]  # the search order
        lines.append(f"    source: {MULTI30K_MIRROR}{n}.gz")
    fetch = f"`llmlab data download {spec.name}` (needs internet; writes {dirs[0]}/)"
    if test_set != MULTI30K_DEFAULT_TEST:
        fetch += f", which fetches train, val and {MULTI30K_DEFAULT_TEST}; get the {test_set} files from the "
        fetch += "source URLs above"
    lines.append(
        f"To fix: run `llmlab data status` to see what is found, then {fetch}, or put the files there by "
        "hand, or point LLMLAB_DATA (or --data-dir) at a folder that has them."
    )
    return DataMissingError("\n".join(lines), dataset=spec.name, missing=missing, root=root)


# ---------------------------------------------------------------------------------------------------------
# Multi30k: loading
# ---------------------------------------------------------------------------------------------------------


def _verify_any(path: Path, fspecs: Sequence[FileSpec], dataset: str) -> bool:
    """True when the file matches one of the known digests (False: none known); else the first one's
    DataCorruptError."""
    checked = [f for f in fspecs if f.checksum[0]]
    error: DataCorruptError | None = None
    for f in checked:
        try:
            verify_file(path, f, dataset)
            return True
        except DataCorruptError as e:
            error = error or e
    if error is not None:
        raise error
    return False


def _read_multi30k_archives(src: Multi30kSource) -> dict[str, dict[str, tuple[list[str], str]]]:
    """split -> lang -> (lines, where), each split read from its archive."""
    out: dict[str, dict[str, tuple[list[str], str]]] = {}
    for split, (_, stem) in MULTI30K_ARCHIVES.items():
        path = src.files[split]
        names = {f"{stem}.{lang}": lang for lang in ("en", "de")}
        got: dict[str, tuple[list[str], str]] = {}
        for member, data in _archive_members(path, lambda m, names=names: _basename(m) in names):
            where = f"{path}:{member}"
            got.setdefault(names[_basename(member)], (split_lines(_decode(data, where)), where))
        absent = [n for n, lang in names.items() if lang not in got]
        if absent:
            raise DataCorruptError(
                f"{path}: no member {' or '.join(absent)}; this is not the WMT16 {split} archive "
                f"(expected members {', '.join(names)}). Replace it with the official file.",
                path=path,
            )
        out[split] = got
    return out


def load_multi30k(
    root: str | Path | None = None,
    src_lang: str = "en",
    tgt_lang: str = "de",
    test_set: str = MULTI30K_DEFAULT_TEST,
    *,
    verify: bool = True,
    spec: DatasetSpec | None = None,
) -> ParallelCorpus:
    """Multi30k Task 1 from the data root (`root` > LLMLAB_DATA > ~/.cache/llmlab), in file order.

    Layouts and checks: see the module docstring. `src_lang`/`tgt_lang`: "en"/"de" or "de"/"en". `test_set`:
    one of MULTI30K_TEST_SETS whose files are present. With `verify`, every file read that has a known digest
    is checked (the store caches the result, so only the first load hashes) and DataCorruptError is raised on
    a mismatch. `spec` replaces the registered spec (its digests and search folders), e.g. in tests.
    Raises ValueError (language pair, unknown test set), DataMissingError (naming the files, the folders
    searched and the fix) and DataCorruptError (checksum, line counts that differ between the two sides,
    non-UTF-8 text, a damaged archive).
    """
    spec = spec or MULTI30K
    _check_pair("multi30k", src_lang, tgt_lang)
    root_path, root_source = data_root_source(root)
    if test_set not in MULTI30K_TEST_SETS:
        present = _present_test_sets(spec, root_path)
        raise ValueError(
            f"unknown Multi30k test set {test_set!r}; the published ones are {', '.join(MULTI30K_TEST_SETS)} "
            f"(present under {root_path}: {', '.join(present) or 'none'})"
        )
    src = find_multi30k(root_path, test_set, spec)
    if src is None:
        raise _multi30k_missing(spec, root_path, root_source, test_set)
    notes: list[str] = []
    if src.layout == "raw":
        if verify:
            unchecked = [
                n for n, p in src.files.items() if not _verify_any(p, _specs_named(spec, n), spec.name)
            ]
            notes.append(
                "checksums verified (sha256 of the decompressed content)"
                + (f"; no digest known for {', '.join(unchecked)}" if unchecked else "")
            )
        lines = {
            split: {
                lang: (read_lines(src.files[f"{stem}.{lang}"]), str(src.files[f"{stem}.{lang}"]))
                for lang in ("en", "de")
            }
            for split, stem in zip(SPLITS, ("train", "val", test_set), strict=True)
        }
    else:
        if verify:
            for split, path in src.files.items():
                if not _verify_any(path, _specs_named(spec, path.name), spec.name):
                    notes.append(f"no digest known for {path.name} ({split}); not verified")
            notes.append("archive checksums verified (sha256 of the files, as torchtext checks them)")
        lines = _read_multi30k_archives(src)
    if not verify:
        notes.append("checksums not verified (verify=False)")
    splits = {}
    for split in SPLITS:
        (en, en_where), (de, de_where) = lines[split]["en"], lines[split]["de"]
        en, de = _align(en, de, en_where, de_where, split)
        splits[split] = _orient(en, de, src_lang)
    return ParallelCorpus(
        name="multi30k",
        src_lang=src_lang,
        tgt_lang=tgt_lang,
        splits=splits,
        source=src.where,
        layout=src.layout,
        test_name=test_set,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------------------
# IWSLT 2017: facts
# ---------------------------------------------------------------------------------------------------------

IWSLT_SUBDIRS = ("iwslt2017", "iwslt", "")
IWSLT_FOLDER = "en-de"
IWSLT_TGZ = "en-de.tgz"
IWSLT_ZIP = "en-de.zip"
IWSLT_TRAIN = {"en": "train.tags.en-de.en", "de": "train.tags.en-de.de"}
IWSLT_VAL = "dev2010"
IWSLT_TEST_SETS = ("tst2010", "tst2011", "tst2012", "tst2013", "tst2014", "tst2015")
IWSLT_ALL_TESTS = "tst2010-2015"  # the Hugging Face test split: the six sets concatenated in year order
IWSLT_DEFAULT_TEST = "tst2010"
WIT3_URL = "https://wit3.fbk.eu/2017-01"
HF_NAME = "IWSLT/iwslt2017"
HF_CONFIG = "iwslt2017-en-de"
HF_URL = "https://huggingface.co/datasets/IWSLT/iwslt2017"
HF_ZIP_PATH = "data/2017-01-trnted/texts/en/de/en-de.zip"
# The en-de.tgz Hugging Face hosted at revision ebd7c60d, as its dataset_infos.json records it (sha256, size).
IWSLT_MIRROR = (
    "https://huggingface.co/datasets/iwslt2017/resolve/ebd7c60d9800c2a1be010a227e5f0a2363730f7a/"
    "data/2017-01-trnted/texts/en/de/"
)
HF_TGZ_SHA256 = "623caec69988b224dbe741f16ad90411b93430117a8021c4bb2bcab7ad1eb21e"
HF_TGZ_SIZE = 16751364
HF_COUNTS = {"train": 206112, "validation": 888, "test": 8079}  # iwslt2017-en-de in dataset_infos.json

# `IWSLT17.TED.dev2010.en-de.en.xml` (any IWSLTnn prefix), as a file or member base name
_XML_NAME = re.compile(r"IWSLT\d+\.TED\.((?:dev|tst)\d{4})\.en-de\.(en|de)\.xml")
# Metadata tags of the train.tags files (a kept German line must not be one: that is a misalignment)
_META = re.compile(
    r"<\s*/?\s*(url|talkid|title|description|keywords|speaker|reviewer|translator|doc|head|transcript)\b",
    re.I,
)
_DOC_OR_SEG = re.compile(r"<doc\b([^>]*)>|<seg\b([^>]*)>(.*?)</seg\s*>", re.S | re.I)
_ENTITY = re.compile(r"&(?:#(\d+)|#[xX]([0-9a-fA-F]+)|(amp|lt|gt|quot|apos));")
_NAMED = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}


def _attr(attrs: str, name: str) -> str:
    m = re.search(rf"\b{name}\s*=\s*(?:\"([^\"]*)\"|'([^']*)'|([^\s>]+))", attrs, re.I)
    return "" if m is None else next(g for g in m.groups() if g is not None).strip()


def unescape_xml(text: str) -> str:
    """Undo XML escapes: the five named entities and numeric character references."""

    def one(m: re.Match) -> str:
        if m.group(3):
            return _NAMED[m.group(3)]
        code = int(m.group(1)) if m.group(1) else int(m.group(2), 16)
        return chr(code) if 0 < code <= 0x10FFFF else m.group(0)

    return _ENTITY.sub(one, text)


def parse_segments(text: str) -> list[tuple[str, str, str]]:
    """(docid, seg id, text) of every `<seg id="N"> text </seg>` of an IWSLT XML file, in file order; the text
    unescaped, line breaks inside a segment made spaces, stripped."""
    out = []
    docid = ""
    for m in _DOC_OR_SEG.finditer(text):
        if m.group(1) is not None:
            docid = _attr(m.group(1), "docid")
            continue
        body = re.sub(r"\s*[\r\n]+\s*", " ", unescape_xml(m.group(3)))
        out.append((docid, _attr(m.group(2), "id"), body.strip()))
    return out


# ---------------------------------------------------------------------------------------------------------
# IWSLT 2017: finding, status
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IwsltSource:
    """Where IWSLT 2017 en-de was found: one of IWSLT_LAYOUTS and the folder or archive."""

    layout: str  # "folder" | "tgz" | "zip" | "hf"
    path: Path


def _iwslt_find_layout(spec: DatasetSpec, root: Path, layout: str) -> IwsltSource | None:
    for d in _search_dirs(spec, root):
        if layout == "folder":
            for p in (d / IWSLT_FOLDER, d):
                if (p / IWSLT_TRAIN["en"]).is_file():
                    return IwsltSource("folder", p)
        elif layout == "tgz" and (d / IWSLT_TGZ).is_file():
            return IwsltSource("tgz", d / IWSLT_TGZ)
        elif layout == "zip" and (d / IWSLT_ZIP).is_file():
            return IwsltSource("zip", d / IWSLT_ZIP)
    return None


def find_iwslt2017(root: str | Path | None = None, spec: DatasetSpec | None = None) -> IwsltSource | None:
    """The first local layout under the data root: an en-de folder, then en-de.tgz, then en-de.zip, each
    looked for in `iwslt2017/`, `iwslt/`, then the root; None when there is none."""
    spec = spec or IWSLT2017
    root_path = data_root_source(root)[0]
    for layout in ("folder", "tgz", "zip"):
        src = _iwslt_find_layout(spec, root_path, layout)
        if src is not None:
            return src
    return None


def _wanted_iwslt(member: str) -> bool:
    base = _basename(member)
    return base in IWSLT_TRAIN.values() or _XML_NAME.fullmatch(base) is not None


def _read_iwslt_files(src: IwsltSource) -> dict[str, tuple[bytes, str]]:
    """Base name -> (bytes, where) of the train.tags and XML files of a local source."""
    out: dict[str, tuple[bytes, str]] = {}
    if src.layout == "folder":
        for entry in sorted(os.listdir(src.path)):
            path = src.path / entry
            if _wanted_iwslt(entry) and path.is_file():
                out[entry] = (path.read_bytes(), str(path))
        return out
    for member, data in _archive_members(src.path, _wanted_iwslt):
        out.setdefault(_basename(member), (data, f"{src.path}:{member}"))
    return out


def _xml_name(set_name: str, lang: str) -> str:
    return f"IWSLT17.TED.{set_name}.en-de.{lang}.xml"


def _xml_sets(names) -> dict[str, dict[str, str]]:
    """set name -> lang -> base name, of the XML files among `names`."""
    sets: dict[str, dict[str, str]] = {}
    for n in names:
        m = _XML_NAME.fullmatch(n)
        if m:
            sets.setdefault(m.group(1), {})[m.group(2)] = n
    return sets


def _iwslt_listing(src: IwsltSource) -> list[str]:
    """Base names of the relevant files of a local source (no content read for archives' XML sizes)."""
    if src.layout == "folder":
        return [e for e in os.listdir(src.path) if _wanted_iwslt(e) and (src.path / e).is_file()]
    try:
        if zipfile.is_zipfile(src.path):
            with zipfile.ZipFile(src.path) as zf:
                names = [i.filename for i in zf.infolist() if not i.is_dir()]
        else:
            with tarfile.open(src.path, "r|*") as tf:
                names = [m.name for m in tf if m.isfile()]
    except (OSError, EOFError, zlib.error, tarfile.TarError, zipfile.BadZipFile):
        return []
    return [_basename(n) for n in names if not _skip_member(n) and _wanted_iwslt(n)]


def _inspect_iwslt(spec: DatasetSpec, root: Path, verify: bool) -> tuple[str, list[FileStatus]]:
    """`DatasetSpec.inspect` for `dataset_status`: the layout found and the state of its files."""
    src = find_iwslt2017(root, spec)
    if src is None:
        return "", [file_status(None, f, spec.name, verify) for f in spec.files]
    layout = IWSLT_LAYOUTS[src.layout]
    if src.layout == "folder":
        names = _iwslt_listing(src)
        sets = _xml_sets(names)
        statuses = [FileStatus(n, src.path / n if n in names else None, None) for n in IWSLT_TRAIN.values()]
        for set_name in (IWSLT_VAL, *IWSLT_TEST_SETS):
            for lang in ("en", "de"):
                actual = sets.get(set_name, {}).get(lang)
                path = src.path / actual if actual else None
                statuses.append(FileStatus(actual or _xml_name(set_name, lang), path, None))
        return layout + " (no checksum published: parsed, not verified)", statuses
    status = file_status(src.path, _known(spec, src.path.name, raw=True), spec.name, verify)
    if status.ok is False:  # another copy of the archive, not a damaged one: WIT3 publishes no checksum
        return layout + ", not Hugging Face's copy (unverified)", [FileStatus(src.path.name, src.path, None)]
    return layout, [status]


def _check_iwslt_download(fspec: FileSpec, path: Path) -> None:
    """`DatasetSpec.check_download`: the archive opens and holds both train.tags files and dev2010."""
    names = set(_iwslt_listing(IwsltSource("tgz", path)))
    needed = {*IWSLT_TRAIN.values(), _xml_name(IWSLT_VAL, "en"), _xml_name(IWSLT_VAL, "de")}
    if not needed <= names:
        lacks = ", ".join(sorted(needed - names))
        raise ValueError(f"{fspec.name} lacks {lacks}: not the IWSLT 2017 en-de archive")


IWSLT2017 = register_dataset(
    DatasetSpec(
        name="iwslt2017",
        description="IWSLT 2017 TED talks En-De (Cettolo et al. 2017), train.tags / dev2010 / tst2010-2015",
        subdirs=IWSLT_SUBDIRS,
        # What `llmlab data download iwslt2017` fetches: Hugging Face's copy, with the sha256 it records.
        files=(FileSpec(IWSLT_TGZ, sha256=HF_TGZ_SHA256, size=HF_TGZ_SIZE, raw=True),),
        mirrors=(IWSLT_MIRROR,),
        homepage=WIT3_URL,
        citation="M. Cettolo, M. Federico, L. Bentivogli, J. Niehues, S. Stueker, K. Sudoh, K. Yoshino, "
        "C. Federmann, Overview of the IWSLT 2017 Evaluation Campaign, IWSLT 2017; M. Cettolo, C. Girardi, "
        "M. Federico, WIT3: Web Inventory of Transcribed and Translated Talks, EAMT 2012",
        license="CC BY-NC-ND 3.0, TED Conference LLC (the archive's README)",
        inspect=_inspect_iwslt,
        check_download=_check_iwslt_download,
    )
)


def _iwslt_missing(spec: DatasetSpec, root: Path, root_source: str, extra: str = "") -> DataMissingError:
    dirs = _search_dirs(spec, root)
    where = " then ".join(f"{d}/" for d in dirs)
    src = f" (from {root_source})" if root_source else ""
    lines = [
        f"dataset {spec.name!r}: no accepted layout of IWSLT 2017 en-de under the data root {root}{src}.",
        f"Accepted layouts, looked for in {where} (the first found is used):",
        f"  1. the extracted folder {IWSLT_FOLDER}/ ({IWSLT_TRAIN['en']}, {IWSLT_TRAIN['de']}, "
        f"{_xml_name(IWSLT_VAL, 'en')}, ... {_xml_name('tst2015', 'de')}), or a search folder holding them",
        f"  2. the WIT3 archive {IWSLT_TGZ} (read in place)",
        f"  3. the Hugging Face archive {IWSLT_ZIP} (read in place)",
        f'  4. Hugging Face datasets, load_iwslt2017(layout="hf", test_set="{IWSLT_ALL_TESTS}") '
        f"(`pip install datasets` and internet; its test split is {IWSLT_ALL_TESTS} concatenated)",
        "Paths looked at:",
    ]
    for d in dirs:
        lines += [f"  {d / IWSLT_FOLDER / IWSLT_TRAIN['en']}", f"  {d / IWSLT_TGZ}", f"  {d / IWSLT_ZIP}"]
    lines += [
        f"Official sources: {WIT3_URL} (2017-01-trnted/texts/en/de/{IWSLT_TGZ}), or {HF_URL} "
        f"({HF_ZIP_PATH}).",
    ]
    if extra:
        lines.append(extra)
    lines.append(
        f"To fix: run `llmlab data status`, then `llmlab data download {spec.name}` (needs internet; writes "
        f"{dirs[0]}/{IWSLT_TGZ}, Hugging Face's copy, sha256-verified), or put one of the layouts there by "
        "hand, or point LLMLAB_DATA (or --data-dir) at a folder that has it; or `pip install datasets` and "
        f'use layout="hf" with internet.'
    )
    return DataMissingError("\n".join(lines), dataset=spec.name, missing=[IWSLT_TGZ], root=root)


# ---------------------------------------------------------------------------------------------------------
# IWSLT 2017: reading
# ---------------------------------------------------------------------------------------------------------


def _parse_train(en: tuple[bytes, str], de: tuple[bytes, str]) -> tuple[list[str], list[str]]:
    """The sentence pairs of train.tags.en-de.{en,de}: metadata lines dropped as the Hugging Face script does
    (the pair goes when the English line starts with "<"), alignment checked on both sides."""
    en_lines, de_lines = split_lines(_decode(*en)), split_lines(_decode(*de))
    if len(en_lines) != len(de_lines):
        raise DataCorruptError(
            f"train: {en[1]} has {len(en_lines)} lines but {de[1]} has {len(de_lines)}; the two files must "
            "align line by line (metadata lines included). Replace them with an official copy.",
            path=en[1],
        )
    out_en, out_de = [], []
    for n, (e, d) in enumerate(zip(en_lines, de_lines, strict=True), 1):
        meta = e.startswith("<")
        if (meta and not d.startswith("<")) or (not meta and _META.match(d)):
            raise DataCorruptError(
                f"train: line {n} is a metadata line on one side only ({en[1]}: {e[:60]!r}; {de[1]}: "
                f"{d[:60]!r}); the two files are not aligned. Replace them with an official copy.",
                path=en[1],
            )
        if meta:
            continue
        out_en.append(e)
        out_de.append(d)
    return out_en, out_de


def _parse_xml_pair(
    en: tuple[bytes, str], de: tuple[bytes, str], set_name: str
) -> tuple[list[str], list[str]]:
    en_segs, de_segs = parse_segments(_decode(*en)), parse_segments(_decode(*de))
    if not en_segs or not de_segs:
        empty = en[1] if not en_segs else de[1]
        raise DataCorruptError(f"{set_name}: {empty} holds no <seg id=...> elements", path=empty)
    if [s[:2] for s in en_segs] != [s[:2] for s in de_segs]:
        pairs = enumerate(zip(en_segs, de_segs, strict=False))
        i = next((k for k, (a, b) in pairs if a[:2] != b[:2]), min(len(en_segs), len(de_segs)))
        at = f"first difference at segment {i + 1}"
        if i < len(en_segs) and i < len(de_segs):
            at += f" (doc {en_segs[i][0]} seg {en_segs[i][1]} vs doc {de_segs[i][0]} seg {de_segs[i][1]})"
        raise DataCorruptError(
            f"{set_name}: {en[1]} has {len(en_segs)} segments and {de[1]} has {len(de_segs)}, not the same "
            f"(docid, seg id) sequence; {at}. Replace them with an official copy.",
            path=en[1],
        )
    return [s[2] for s in en_segs], [s[2] for s in de_segs]


def _iwslt_test_names(test_set: str) -> tuple[str, ...]:
    return IWSLT_TEST_SETS if test_set == IWSLT_ALL_TESTS else (test_set,)


def _read_iwslt_local(src: IwsltSource, test_set: str) -> dict[str, tuple[list[str], list[str]]]:
    """split -> (en lines, de lines) of a local source."""
    files = _read_iwslt_files(src)
    sets = _xml_sets(files)
    complete = [s for s in sorted(sets) if s.startswith("tst") and len(sets[s]) == 2]
    available = complete + ([IWSLT_ALL_TESTS] if set(IWSLT_TEST_SETS) <= set(complete) else [])
    if test_set not in available:
        raise ValueError(
            f"IWSLT 2017 test set {test_set!r} is not in the {IWSLT_LAYOUTS[src.layout]} {src.path}; test "
            f"sets found there: {', '.join(available) or 'none'} (published: {', '.join(IWSLT_TEST_SETS)}, "
            f"and {IWSLT_ALL_TESTS} = all six concatenated, the Hugging Face test split)"
        )
    absent = [n for n in IWSLT_TRAIN.values() if n not in files]
    absent += [_xml_name(IWSLT_VAL, lang) for lang in ("en", "de") if lang not in sets.get(IWSLT_VAL, {})]
    if absent:
        raise DataMissingError(
            f"IWSLT 2017: the {IWSLT_LAYOUTS[src.layout]} {src.path} lacks {', '.join(absent)}; it is "
            f"incomplete. Get the whole {IWSLT_TGZ} from {WIT3_URL} (or `llmlab data download iwslt2017`).",
            dataset="iwslt2017",
            missing=absent,
        )

    def xml(set_name: str, lang: str) -> tuple[bytes, str]:
        return files[sets[set_name][lang]]

    train = _parse_train(files[IWSLT_TRAIN["en"]], files[IWSLT_TRAIN["de"]])
    val = _parse_xml_pair(xml(IWSLT_VAL, "en"), xml(IWSLT_VAL, "de"), IWSLT_VAL)
    test_en: list[str] = []
    test_de: list[str] = []
    for name in _iwslt_test_names(test_set):
        en, de = _parse_xml_pair(xml(name, "en"), xml(name, "de"), name)
        test_en += en
        test_de += de
    return {"train": train, "val": val, "test": (test_en, test_de)}


def _datasets_importable() -> bool:
    try:
        import datasets  # noqa: F401  (optional: not a dependency of llmlab)
    except ImportError:
        return False
    return True


def _read_iwslt_hf() -> dict[str, tuple[list[str], list[str]]]:
    try:
        import datasets  # optional: not a dependency of llmlab
    except ImportError as e:
        raise DataMissingError(
            'IWSLT 2017 from Hugging Face (layout="hf") needs the optional `datasets` package: `pip install '
            "datasets` (and internet on first use). Or use a local layout: `llmlab data download "
            f"iwslt2017`, or place {IWSLT_TGZ} ({WIT3_URL}) or {IWSLT_ZIP} ({HF_URL}, {HF_ZIP_PATH}) under "
            "the data root.",
            dataset="iwslt2017",
        ) from e
    try:
        ds = datasets.load_dataset(HF_NAME, HF_CONFIG)
    except Exception as e:  # offline, hub errors, script policy, cache problems: "not available from HF now"
        raise DataMissingError(
            f"IWSLT 2017 from Hugging Face: datasets.load_dataset({HF_NAME!r}, {HF_CONFIG!r}) failed "
            f"({type(e).__name__}: {e}). It needs internet on first use (recent `datasets` releases may also "
            f"refuse dataset scripts); offline, use a local layout ({IWSLT_TGZ} from {WIT3_URL}).",
            dataset="iwslt2017",
        ) from e
    out = {}
    for split, hf_split in (("train", "train"), ("val", "validation"), ("test", "test")):
        rows = ds[hf_split]["translation"]
        en = [str(r["en"]).strip() for r in rows]
        de = [str(r["de"]).strip() for r in rows]
        if split != "train":  # the script cuts the <seg> text out without unescaping it; ours is unescaped
            en, de = [unescape_xml(s) for s in en], [unescape_xml(s) for s in de]
        out[split] = (en, de)
    return out


def load_iwslt2017(
    root: str | Path | None = None,
    src_lang: str = "en",
    tgt_lang: str = "de",
    test_set: str = IWSLT_DEFAULT_TEST,
    layout: str | None = None,
    *,
    verify: bool = True,
    spec: DatasetSpec | None = None,
) -> ParallelCorpus:
    """IWSLT 2017 en-de (TED talks) from the data root (`root` > LLMLAB_DATA > ~/.cache/llmlab), file order.

    train = train.tags.en-de (metadata lines dropped), val = dev2010, test = `test_set`: one of tst2010 ...
    tst2015 present in the source, or "tst2010-2015" (all six concatenated: the Hugging Face test split).
    `layout`: None (the first local layout found: folder, en-de.tgz, en-de.zip; when none is, Hugging Face
    datasets if the package is importable and `test_set` is "tst2010-2015"), one of "folder", "tgz", "zip",
    or "hf" (`datasets.load_dataset("IWSLT/iwslt2017", "iwslt2017-en-de")`, needs the package and internet;
    only test_set="tst2010-2015", since its test split does not say which set a row comes from). With
    `verify`, an en-de.tgz is compared with the digest Hugging Face records for its copy; a match is noted,
    another copy is read unverified (WIT3 publishes no checksum). `spec` replaces the registered spec.
    Raises ValueError (language pair, layout, test set), DataMissingError and DataCorruptError (line counts or
    segments that differ between the sides, metadata lines out of step, non-UTF-8 text, a damaged archive).
    """
    spec = spec or IWSLT2017
    _check_pair("iwslt2017", src_lang, tgt_lang)
    if layout is not None and layout not in IWSLT_LAYOUTS:
        raise ValueError(f"unknown IWSLT 2017 layout {layout!r}; choose from {', '.join(IWSLT_LAYOUTS)}")
    if test_set not in (*IWSLT_TEST_SETS, IWSLT_ALL_TESTS):
        raise ValueError(
            f"unknown IWSLT 2017 test set {test_set!r}; the published ones are {', '.join(IWSLT_TEST_SETS)}, "
            f"and {IWSLT_ALL_TESTS} (all six concatenated, the Hugging Face test split)"
        )
    notes: list[str] = []
    root_path, root_source = data_root_source(root)
    src = None
    if layout != "hf":
        if layout is None:
            src = find_iwslt2017(root_path, spec)
        else:
            src = _iwslt_find_layout(spec, root_path, layout)
        if src is None and layout is not None:
            raise _iwslt_missing(spec, root_path, root_source, f'(layout="{layout}" was asked for.)')
    if src is None:  # Hugging Face: asked for, or nothing local and the package is there
        if test_set != IWSLT_ALL_TESTS:
            if layout == "hf":
                raise ValueError(
                    f"the Hugging Face copy of IWSLT 2017 has one test split, {IWSLT_ALL_TESTS} concatenated "
                    f"(its script iwslt2017.py), so test set {test_set!r} cannot be taken from it: pass "
                    f'test_set="{IWSLT_ALL_TESTS}", or use a local layout'
                )
            hint = ""
            if _datasets_importable():
                hint = (
                    "The `datasets` package is installed, but Hugging Face's test split is "
                    f'{IWSLT_ALL_TESTS} concatenated: pass test_set="{IWSLT_ALL_TESTS}" to use it.'
                )
            raise _iwslt_missing(spec, root_path, root_source, hint)
        if layout is None and not _datasets_importable():
            raise _iwslt_missing(spec, root_path, root_source)
        by_lang = _read_iwslt_hf()
        src = IwsltSource("hf", Path(HF_NAME))
        where = f"Hugging Face datasets {HF_NAME} ({HF_CONFIG})"
        notes.append("read through Hugging Face datasets; no file checksum applies")
    else:
        by_lang = _read_iwslt_local(src, test_set)
        where = str(src.path)
        if src.layout == "tgz" and verify:
            status = file_status(src.path, _known(spec, IWSLT_TGZ, raw=True), spec.name, True)
            if status.ok:
                notes.append(f"{IWSLT_TGZ} is Hugging Face's copy (sha256 {HF_TGZ_SHA256[:12]}...)")
            else:
                notes.append(
                    f"{IWSLT_TGZ} is not Hugging Face's copy; WIT3 publishes no checksum: unverified"
                )
        else:
            notes.append("no checksum is published for these files: parsed, not verified")
    splits = {}
    for split in SPLITS:
        en, de = by_lang[split]
        splits[split] = _orient(en, de, src_lang)
    return ParallelCorpus(
        name="iwslt2017",
        src_lang=src_lang,
        tgt_lang=tgt_lang,
        splits=splits,
        source=where,
        layout=src.layout,
        test_name=test_set,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------

LOADERS = {"multi30k": load_multi30k, "iwslt2017": load_iwslt2017}


def load_parallel(
    name: str,
    root: str | Path | None = None,
    src_lang: str = "en",
    tgt_lang: str = "de",
    test_set: str | None = None,
) -> ParallelCorpus:
    """`load_multi30k` or `load_iwslt2017` by name; `test_set` None: that loader's default."""
    key = name.lower().replace("-", "").replace("_", "")
    key = {"multi30k": "multi30k", "iwslt2017": "iwslt2017", "iwslt": "iwslt2017"}.get(key, key)
    if key not in LOADERS:
        raise ValueError(f"unknown parallel corpus {name!r}; choose from {', '.join(LOADERS)}")
    kwargs = {} if test_set is None else {"test_set": test_set}
    return LOADERS[key](root, src_lang, tgt_lang, **kwargs)
