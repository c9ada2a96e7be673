"""Where datasets live, what files are expected, their status, checksums and download.

Conventions (see docs/DESIGN.md, "Data"):
- the data root is `--data-dir` > env `LLMLAB_DATA` > `~/.cache/llmlab`; it may be read-only, so nothing is
  written there except by `download_dataset`;
- derived caches (here: the checksum-verification cache) go to `cache_dir()`: env `LLMLAB_CACHE` >
  `~/.cache/llmlab/derived`;
- a file is accepted gzipped (`NAME.gz`) or plain (`NAME`); its sha256 is taken over the DECOMPRESSED content,
  so a re-compressed .gz with identical content still verifies (gzip headers carry timestamps and names);
- a `raw` file (an archive read as it is, e.g. CIFAR-10's `cifar-10-python.tar.gz`) is found only under its
  name and its checksums are of the file's bytes as stored; where a dataset publishes only an md5 of the file
  (CIFAR-10), `FileSpec.md5` is checked instead of a sha256;
- a dataset accepted in several layouts (CIFAR-10: official tarball, extracted batches, image folders)
  gives its spec an `inspect` hook that reports the layout found; `files` then lists what
  `download_dataset` fetches;
- every dataset is described by a `DatasetSpec` in the `DATASETS` registry; dataset modules register theirs.

Downloads follow torchvision's MNIST practice: a list of mirrors tried in order, the file verified after
download; written atomically (temp file in the target folder, fsync, os.replace) so a failure never leaves a
partial file behind.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llmlab.fileio import atomic_write_bytes
from llmlab.progress import progress_enabled

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20  # 1 MiB: streaming unit for hashing and downloads
_VERIFY_CACHE_NAME = "verified-sha256.json"
# Keys of a verification-cache entry, by what they digest: "sha256" (decompressed content, the original key),
# "file_sha256" and "file_md5" (the file's bytes as stored).
_WHAT = {
    "sha256": "sha256 of the decompressed content",
    "file_sha256": "sha256 of the file",
    "file_md5": "md5 of the file",
}
_STATUS_HINT = "llmlab data status"


# ---------------------------------------------------------------------------------------------------------
# Locations
# ---------------------------------------------------------------------------------------------------------


def data_root_source(override: str | Path | None = None) -> tuple[Path, str]:
    """The data root and where it comes from: "--data-dir", "env LLMLAB_DATA" or "default"."""
    if override is not None and str(override) != "":
        return Path(override).expanduser(), "--data-dir"
    env = os.environ.get("LLMLAB_DATA", "")
    if env:
        return Path(env).expanduser(), "env LLMLAB_DATA"
    return Path("~/.cache/llmlab").expanduser(), "default"


def data_root(override: str | Path | None = None) -> Path:
    """The data root: `override` (the CLI's --data-dir) > env LLMLAB_DATA > ~/.cache/llmlab. Not created."""
    return data_root_source(override)[0]


def cache_dir() -> Path:
    """A writable folder for derived caches: env LLMLAB_CACHE > ~/.cache/llmlab/derived. Created on demand."""
    env = os.environ.get("LLMLAB_CACHE", "")
    path = Path(env).expanduser() if env else Path("~/.cache/llmlab/derived").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------------------
# Specs and registry
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileSpec:
    """One canonical file of a dataset, accepted on disk as `name.gz` or `name` (only `name` when `raw`).

    Checked against `sha256` when known, else against `md5` (some datasets publish only an md5 of the file);
    a spec with neither is found but not checked.
    """

    name: str  # canonical (decompressed) file name, e.g. "train-images-idx3-ubyte"
    sha256: str = ""  # of the DECOMPRESSED content (of the file's bytes when `raw`); "" when unknown
    size: int = 0  # bytes of the decompressed content (of the file when `raw`); 0 when unknown
    url_name: str = ""  # file name on the mirrors; default `name + ".gz"` (`name` when `raw`)
    md5: str = ""  # of the file's bytes as stored; checked only when `sha256` is not known
    raw: bool = False  # used as stored (a .tar.gz read by tarfile): no .gz variant, checksums of its bytes

    @property
    def remote_name(self) -> str:
        return self.url_name or (self.name if self.raw else self.name + ".gz")

    @property
    def checksum(self) -> tuple[str, str]:
        """(verification-cache key, expected hex digest) of the check `verify_file` does; ("", "") if none."""
        if self.sha256:
            return ("file_sha256" if self.raw else "sha256"), self.sha256
        if self.md5:
            return "file_md5", self.md5
        return "", ""


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: where its files are searched under the data root, what they are, where they come from."""

    name: str
    description: str
    subdirs: tuple[str, ...] = ()  # searched in order under the root; downloads go to the first
    files: tuple[FileSpec, ...] = ()
    mirrors: tuple[str, ...] = ()  # base URLs, tried in order
    homepage: str = ""
    citation: str = ""
    license: str = ""
    bundled: bool = False  # shipped with a library (no files, no download)
    # Other accepted files with known checksums (other layouts, e.g. a community copy); never downloaded.
    alternatives: tuple[FileSpec, ...] = ()
    # For datasets with several accepted layouts: `inspect(spec, root, verify) -> (layout, file statuses)`
    # of the first layout found under `root` (the statuses of `files`, all missing, when none is);
    # `dataset_status` uses it instead of looking for `files`.
    inspect: Callable[[DatasetSpec, Path, bool], tuple[str, list[FileStatus]]] | None = field(
        default=None, repr=False, compare=False
    )
    # Checks a downloaded file beyond its checksum (e.g. that an archive opens and holds the expected
    # members): `check_download(fspec, path)` runs on the temp file before it is moved into place and raises
    # ValueError when the file is not what it should be (that mirror then counts as failed).
    check_download: Callable[[FileSpec, Path], None] | None = field(default=None, repr=False, compare=False)


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add a spec to the registry (dataset modules call this at import time)."""
    DATASETS[spec.name] = spec
    return spec


def get_spec(name: str | DatasetSpec) -> DatasetSpec:
    """The spec for `name` (a spec passes through); unknown names list the known ones."""
    if isinstance(name, DatasetSpec):
        return name
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(sorted(DATASETS)) or "(none)"
        raise KeyError(f"unknown dataset {name!r}; known datasets: {known}") from None


def mirrors_for(spec: DatasetSpec, mirrors: Sequence[str] | None = None) -> list[str]:
    """Mirrors to try: the `mirrors` argument > env LLMLAB_MIRROR_<NAME> (comma-separated) > the spec's."""
    if mirrors:
        return list(mirrors)
    env = os.environ.get(mirror_env_var(spec.name), "")
    urls = [u for u in re.split(r"[,\s]+", env) if u]
    return urls or list(spec.mirrors)


def mirror_env_var(name: str) -> str:
    """`LLMLAB_MIRROR_<NAME>` with the name upper-cased and non-alphanumerics turned into `_`."""
    return "LLMLAB_MIRROR_" + re.sub(r"[^A-Z0-9]", "_", name.upper())


def _url(base: str, fspec: FileSpec) -> str:
    return base.rstrip("/") + "/" + fspec.remote_name


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


def _candidates(spec: DatasetSpec, fspec: FileSpec, root: Path) -> list[Path]:
    # .gz first in each folder: that is what `download_dataset` writes, so a fresh download wins.
    dirs = [root / d for d in spec.subdirs] or [root]
    names = (fspec.name,) if fspec.raw else (fspec.name + ".gz", fspec.name)
    return [d / n for d in dirs for n in names]


class DataMissingError(FileNotFoundError):
    """Files of a dataset are not under the data root. The message says what, where, and how to fix.

    Build it with `DataMissingError.for_files(...)`; `__init__` takes the finished message so the exception
    pickles (e.g. across DataLoader worker processes).
    """

    def __init__(
        self, message: str, *, dataset: str = "", missing: Sequence[str] = (), root: Path | None = None
    ):
        super().__init__(message)
        self.dataset = dataset
        self.missing = list(missing)
        self.root = root

    @classmethod
    def for_files(
        cls, spec: DatasetSpec, missing: Sequence[FileSpec], root: Path, root_source: str = ""
    ) -> DataMissingError:
        src = f" (from {root_source})" if root_source else ""
        lines = [
            f"dataset {spec.name!r}: {len(missing)} of {len(spec.files)} files not found "
            f"under the data root {root}{src}."
        ]
        forms = " (gzipped NAME.gz or plain NAME)" if any(not f.raw for f in missing) else ""
        lines.append(f"Expected files{forms}, paths looked at, official source:")
        for f in missing:
            lines.append(f"  {f.name}:")
            lines += [f"    {p}" for p in _candidates(spec, f, root)]
            if spec.mirrors:
                lines.append(f"    source: {_url(spec.mirrors[0], f)}")
        if spec.homepage:
            lines.append(f"Homepage: {spec.homepage}")
        target = root / spec.subdirs[0] if spec.subdirs else root
        lines.append(
            f"To fix: run `{_STATUS_HINT}` to see what is found, then `llmlab data download {spec.name}` "
            f"(needs internet), or put the files in {target}/ by hand, or point LLMLAB_DATA (or --data-dir) "
            "at a folder that has them."
        )
        return cls("\n".join(lines), dataset=spec.name, missing=[f.name for f in missing], root=root)


class DataCorruptError(ValueError):
    """A file does not have the expected checksum (by default: sha256 of its decompressed content).

    Build it with `DataCorruptError.for_file(...)`; `__init__` takes the finished message (so it pickles).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path = "",
        expected: str = "",
        actual: str = "",
        what: str = _WHAT["sha256"],
    ):
        super().__init__(message)
        self.path = path
        self.expected = expected
        self.actual = actual
        self.what = what  # which checksum, e.g. "md5 of the file"

    @classmethod
    def for_file(
        cls,
        path: str | Path,
        expected: str,
        actual: str,
        detail: str = "",
        dataset: str = "NAME",
        what: str = _WHAT["sha256"],
    ) -> DataCorruptError:
        extra = f" ({detail})" if detail else ""
        return cls(
            f"checksum mismatch for {path}{extra}: {what} is {actual}, "
            f"expected {expected}. The file is damaged or not the official one. To fix: delete it and "
            f"re-download (`llmlab data download {dataset}`), or replace it with an official copy; "
            f"`{_STATUS_HINT}` shows every file's state.",
            path=path,
            expected=expected,
            actual=actual,
            what=what,
        )


def decode_utf8(data: bytes, where: str | Path, advice: str) -> str:
    """`data` as UTF-8 text without a leading BOM; otherwise a DataCorruptError naming the file, line and
    byte, followed by `advice` (what the reader of this kind of file should do)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataCorruptError(
            f"{where}: not UTF-8 text (line {line}, byte {e.start}: {e.reason}). {advice}", path=where
        ) from e
    return text[1:] if text.startswith("\ufeff") else text


class DataDownloadError(RuntimeError):
    """A download could not be done (no mirror answered correctly, or the data root is not writable)."""


# ---------------------------------------------------------------------------------------------------------
# Finding and verifying files
# ---------------------------------------------------------------------------------------------------------


def find_file(spec: DatasetSpec, fspec: FileSpec, root: str | Path) -> Path | None:
    """The first existing candidate for `fspec` under `root` (each subdir in order; `.gz` then plain)."""
    for path in _candidates(spec, fspec, Path(root)):
        if path.is_file():
            return path
    return None


def is_gzip(path: str | Path) -> bool:
    """Whether the file starts with the gzip magic bytes (the name is not trusted)."""
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def open_maybe_gzip(path: str | Path):
    """A binary file object over the decompressed content (gzip detected by magic bytes)."""
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def content_sha256(path: str | Path) -> tuple[str, int]:
    """(sha256 hex, byte count) of the decompressed content, streamed in chunks."""
    h = hashlib.sha256()
    n = 0
    with open_maybe_gzip(path) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def file_digests(path: str | Path) -> tuple[str, str, int]:
    """(sha256 hex, md5 hex, byte count) of the file's bytes as stored (no decompression), in one pass."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            md5.update(chunk)
            n += len(chunk)
    return sha.hexdigest(), md5.hexdigest(), n


def _cache_file() -> Path:
    return cache_dir() / _VERIFY_CACHE_NAME


def _load_verify_cache() -> dict[str, dict]:
    try:
        data = json.loads(_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or damaged cache: just re-hash


def _cached_digest(path: Path, key: str = "sha256") -> str | None:
    st = path.stat()
    entry = _load_verify_cache().get(str(path.resolve()))
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return entry.get(key)
    return None


def _cached_sha256(path: Path) -> str | None:
    return _cached_digest(path, "sha256")


def _remember_digests(path: Path, digests: dict[str, str]) -> None:
    # Digests of one (size, mtime_ns) state of the file accumulate; a changed file starts a fresh entry.
    st = path.stat()
    cache = _load_verify_cache()
    key = str(path.resolve())
    entry = cache.get(key)
    if not (entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns):
        entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    cache[key] = {**entry, **digests}
    try:
        atomic_write_bytes(_cache_file(), json.dumps(cache, indent=1, sort_keys=True).encode())
    except OSError:
        pass  # the cache is an optimisation; never fail a load because it cannot be written


def _remember_sha256(path: Path, sha: str) -> None:
    _remember_digests(path, {"sha256": sha})


def _compute_digests(path: Path, key: str) -> tuple[dict[str, str], int]:
    """The digests `key` belongs to (content sha256, or the file's sha256 and md5 together), a byte count."""
    if key == "sha256":
        sha, n = content_sha256(path)
        return {"sha256": sha}, n
    sha, md5, n = file_digests(path)
    return {"file_sha256": sha, "file_md5": md5}, n


def verify_file(path: str | Path, fspec: FileSpec, dataset: str = "NAME") -> str:
    """Check the file's checksum (`fspec.checksum`); raise DataCorruptError on mismatch.

    By default that is the sha256 of the decompressed content; for a `raw` spec the sha256 of the file's
    bytes; when only an md5 is known, the md5 of the file's bytes. Results are cached in `cache_dir()` keyed
    by (absolute path, size, mtime_ns), so repeated loads do not re-hash; a changed file is re-hashed.
    `dataset` only names the fix in the error. Returns the digest checked ("" when the spec has none).
    """
    path = Path(path)
    key, expected = fspec.checksum
    if not key:
        return ""
    what = _WHAT[key]
    actual = _cached_digest(path, key)
    detail = ""
    if actual is None:
        try:
            digests, n = _compute_digests(path, key)
        except (OSError, EOFError) as e:  # a broken gzip stream is a corrupt file, not a crash
            detail = f"cannot {'decompress' if key == 'sha256' else 'read'}: {e}"
            raise DataCorruptError.for_file(path, expected, "unreadable", detail, dataset, what) from e
        actual = digests[key]
        if fspec.size and n != fspec.size:
            detail = f"{n} bytes{' decompressed' if key == 'sha256' else ''}, expected {fspec.size}"
        _remember_digests(path, digests)
    if actual != expected:
        raise DataCorruptError.for_file(path, expected, actual, detail, dataset, what)
    return actual


def locate_dataset(
    name: str | DatasetSpec, root: str | Path | None = None, verify: bool = True
) -> dict[str, Path]:
    """Paths of all files of a dataset, by canonical name. Loaders call this before reading anything.

    Raises DataMissingError naming every missing file, and DataCorruptError if `verify` and a checksum fails.
    """
    spec = get_spec(name)
    root_path, source = data_root_source(root)
    found = {f.name: find_file(spec, f, root_path) for f in spec.files}
    missing = [f for f in spec.files if found[f.name] is None]
    if missing:
        raise DataMissingError.for_files(spec, missing, root_path, source)
    paths = {k: p for k, p in found.items() if p is not None}
    if verify:
        for f in spec.files:
            verify_file(paths[f.name], f, spec.name)
    return paths


# ---------------------------------------------------------------------------------------------------------
# Status
# ---------------------------------------------------------------------------------------------------------


@dataclass
class FileStatus:
    name: str  # canonical name
    path: Path | None  # where it was found, or None
    ok: bool | None  # checksum ok; None when not found or not checked (or no checksum is known)
    error: str = ""


def file_status(path: Path | None, fspec: FileSpec, dataset: str, verify: bool = True) -> FileStatus:
    """The status of a file found at `path` (None: not found); checked if `verify` and a checksum is known."""
    ok: bool | None = None
    error = ""
    if path is not None and verify and fspec.checksum[0]:
        try:
            verify_file(path, fspec, dataset)
            ok = True
        except DataCorruptError as e:
            ok, error = False, f"{e.what} {e.actual}, expected {e.expected}"
    return FileStatus(fspec.name, path, ok, error)


@dataclass
class DatasetStatus:
    name: str
    state: str  # "present" | "missing" | "partial" | "corrupt" | "bundled"
    root: Path
    root_source: str  # "--data-dir" | "env LLMLAB_DATA" | "default"
    files: list[FileStatus] = field(default_factory=list)
    description: str = ""
    target: Path | None = None  # where `download` would write
    layout: str = ""  # which accepted layout was found, for datasets with several (see DatasetSpec.inspect)


def dataset_status(
    name: str | DatasetSpec, root: str | Path | None = None, verify: bool = True
) -> DatasetStatus:
    """Which files of a dataset are found under the root, and whether their checksums hold."""
    spec = get_spec(name)
    root_path, source = data_root_source(root)
    target = root_path / spec.subdirs[0] if spec.subdirs else root_path
    st = DatasetStatus(spec.name, "bundled", root_path, source, description=spec.description, target=target)
    if spec.bundled:
        st.target = None
        return st
    if spec.inspect is not None:
        st.layout, st.files = spec.inspect(spec, root_path, verify)
    else:
        st.files = [file_status(find_file(spec, f, root_path), f, spec.name, verify) for f in spec.files]
    n_found = sum(fs.path is not None for fs in st.files)
    if any(fs.ok is False for fs in st.files):
        st.state = "corrupt"
    elif n_found == 0:
        st.state = "missing"
    elif n_found < len(st.files):
        st.state = "partial"
    else:
        st.state = "present"
    return st


def format_status(statuses: Sequence[DatasetStatus]) -> str:
    """A plain-text table for `llmlab data status`, with per-file detail for datasets that need action."""
    lines: list[str] = []
    roots = {(s.root, s.root_source) for s in statuses if s.state != "bundled"}
    for root, source in sorted(roots, key=str):
        lines.append(f"data root: {root}  (from {source}; set by --data-dir > LLMLAB_DATA > ~/.cache/llmlab)")
    rows = [("dataset", "state", "files", "description")]
    for s in statuses:
        if s.state == "bundled":
            files = "bundled, no download"
        else:
            n_found = sum(f.path is not None for f in s.files)
            n_ok = sum(f.ok is True for f in s.files)
            checked = all(f.ok is not None for f in s.files if f.path is not None)
            files = f"{n_found}/{len(s.files)} found"
            if checked and n_found:
                files += f", {n_ok} checksum ok"
            if s.layout:
                files += f" ({s.layout})"
        rows.append((s.name, s.state, files, s.description))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3])
    for s in statuses:
        if s.state in ("present", "bundled"):
            continue
        lines.append("")
        lines.append(f"{s.name} ({s.state}):" + (f" {s.layout}" if s.layout else ""))
        for f in s.files:
            if f.path is None:
                lines.append(f"  missing  {f.name}")
            elif f.ok is False:
                lines.append(f"  corrupt  {f.path}: {f.error}")
            else:
                lines.append(f"  ok       {f.path}" if f.ok else f"  found    {f.path}")
        lines.append(
            f"  fix: `llmlab data download {s.name}` (writes to {s.target}/), or place the files "
            "there by hand, or point LLMLAB_DATA / --data-dir elsewhere"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------------------------------------


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".llmlab-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DataDownloadError(
            f"cannot write to {folder}: {e}. The data root may be read-only; pass --data-dir or set "
            "LLMLAB_DATA to a writable folder, or place the files there by hand."
        ) from e


def _fetch_to(
    url: str,
    folder: Path,
    fspec: FileSpec,
    timeout: float,
    progress: bool,
    check: Callable[[FileSpec, Path], None] | None = None,
) -> Path:
    """Download `url` into a temp file in `folder`, verify it, and move it into place. Returns the final path.

    On any failure the temp file is removed and the exception propagates.
    """
    from tqdm.auto import tqdm  # imported here: only downloads need it

    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{fspec.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "llmlab"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=fspec.remote_name,
                disable=not (progress and progress_enabled()),
                leave=False,
            ) as bar:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        key, expected = fspec.checksum
        digests: dict[str, str] = {}
        if key:
            digests, n = _compute_digests(tmp, key)
            if digests[key] != expected:
                detail = f"{n} bytes{' decompressed' if key == 'sha256' else ''}, expected {fspec.size}"
                raise DataCorruptError.for_file(url, expected, digests[key], detail, what=_WHAT[key])
        if check is not None:
            check(fspec, tmp)
        final = folder / (fspec.name + ".gz" if not fspec.raw and is_gzip(tmp) else fspec.name)
        os.replace(tmp, final)
        if digests:  # os.replace keeps size and mtime: the next load need not re-hash
            _remember_digests(final, digests)
        return final
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _drop_shadowing_copy(spec: DatasetSpec, fspec: FileSpec, root: Path, good: Path) -> None:
    # A corrupt copy in the target folder under the other name (NAME vs NAME.gz) would still be found first;
    # the folder is download's own, and a verified copy is now in place, so remove it.
    first = find_file(spec, fspec, root)
    if first is not None and first != good and first.parent == good.parent:
        first.unlink()


def download_dataset(
    name: str | DatasetSpec,
    root: str | Path | None = None,
    mirrors: Sequence[str] | None = None,
    progress: bool = True,
    timeout: float = 30.0,
) -> Path:
    """Download the missing or corrupt files of a dataset into `root/<first subdir>/`; return that folder.

    Only `spec.files` are fetched: a dataset found in another layout (`spec.alternatives`, an image folder)
    still gets its official files. Mirrors: `mirrors` > env LLMLAB_MIRROR_<NAME> > the spec's, tried in order
    per file. Each file is verified (`FileSpec.checksum`: by default the sha256 of the decompressed content)
    (and by `spec.check_download`, when set) before it is moved into place. Raises DataDownloadError if the
    root is not writable or every mirror fails for some file; no partial file is ever left behind.
    """
    spec = get_spec(name)
    if spec.bundled:
        raise ValueError(f"dataset {spec.name!r} is bundled ({spec.description}); nothing to download")
    root_path = data_root(root)
    target = root_path / spec.subdirs[0] if spec.subdirs else root_path
    todo = []
    for f in spec.files:
        path = find_file(spec, f, root_path)
        if path is not None:
            try:
                verify_file(path, f)
                continue
            except DataCorruptError:
                pass  # fetch a good copy into the target folder (see below for the bad one)
        todo.append(f)
    if not todo:
        return target
    _check_writable(target)
    urls = mirrors_for(spec, mirrors)
    if not urls:
        raise DataDownloadError(f"dataset {spec.name!r} has no mirrors; set {mirror_env_var(spec.name)}")
    for f in todo:
        failures: list[str] = []
        for base in urls:
            url = _url(base, f)
            try:
                final = _fetch_to(url, target, f, timeout, progress, spec.check_download)
                _drop_shadowing_copy(spec, f, root_path, final)
                break
            except DataCorruptError as e:
                failures.append(f"{url}: {e.what} {e.actual}, expected {e.expected}")
            except (OSError, http.client.HTTPException, EOFError, ValueError) as e:
                # URLError/HTTPError/timeouts are OSErrors; a broken gzip stream is OSError or EOFError.
                failures.append(f"{url}: {type(e).__name__}: {e}")
        else:
            tried = "\n".join(f"  {x}" for x in failures)
            names = ", ".join(x.remote_name for x in spec.files)
            raise DataDownloadError(
                f"could not download {f.remote_name} for dataset {spec.name!r}; tried:\n{tried}\n"
                f"If offline, fetch the files elsewhere ({names}, from {urls[0]}) and place them in "
                f"{target}/ (gzipped or plain), or set {mirror_env_var(spec.name)} to another mirror. "
                f"`{_STATUS_HINT}` shows what is found."
            )
    return target
