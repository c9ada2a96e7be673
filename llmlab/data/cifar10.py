"""CIFAR-10 read directly from its published python batches, or from image folders (PNG or JPEG).

Reference: A. Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", tech. report, University
of Toronto, 2009; the format is the one on https://www.cs.toronto.edu/~kriz/cifar.html ("Dataset layout",
python version): `data_batch_1..5` and `test_batch` are pickled dicts whose `data` is a uint8 numpy array
[10000, 3072] (each row a 32x32 colour image: 1024 red, then 1024 green, then 1024 blue values, each channel
row-major) and whose `labels` is a list of 10000 ints in 0..9; `batches.meta` holds `label_names`. The files
were pickled by Python 2, so they are read with `encoding="latin1"`, and only through `BatchUnpickler`, which
refuses every global except numpy's array reconstruction: a plain `pickle.load` of a downloaded file runs
arbitrary code.

Accepted layouts, searched under the data root in `cifar10/` and then in the root itself, in this order (the
first found is used; lossless sources come first):
1. `cifar-10-python.tar.gz`, the official tarball, read with tarfile, verified by its published md5;
2. `cifar-10-batches-py/`, that tarball extracted (torchvision's layout), each batch verified by md5;
3. an image-folder tarball (`*.tar.gz`, `*.tgz`, `*.tar`) holding `train/<class>/*.png|jpg` and
   `test/<class>/*` (possibly under one top folder), streamed, never extracted to disk; the lab's shared copy
   `cifar10_jpg.tar.gz` (JPEG, so lossy) is verified by the sha256 of the archive's bytes;
4. an image folder `train/<class>/...` and `test/<class>/...` (the root, or one folder below it).

The source is decoded once into uint8 tensors cached as safetensors in `cache_dir()/cifar10/`, keyed by the
source (path, size and mtime of every file it reads), so a changed source is decoded again; a damaged cache
file is ignored and rebuilt. The data root itself is never written (it may be read-only).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from llmlab.data.store import (
    DataMissingError,
    DatasetSpec,
    FileSpec,
    FileStatus,
    cache_dir,
    data_root_source,
    file_status,
    register_dataset,
    verify_file,
)
from llmlab.fileio import atomic_path
from llmlab.progress import progress_enabled

if TYPE_CHECKING:
    import torch

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel mean and std over all pixels of the official training images scaled to [0, 1]. (The also
# widely copied std (0.2023, 0.1994, 0.2010) is another statistic: the mean of the per-image stds.)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# The same statistics of the lab's JPEG copy (cifar10/cifar10_jpg.tar.gz, sha256 a065349f...), computed from
# its 50000 decoded training images (`dataset_mean_std(load_cifar10().train_images)`): mean (0.4913, 0.4821,
# 0.4465), std (0.2452, 0.2428, 0.2606). The means agree to 2e-4; the stds are 0.3-0.7% lower (JPEG
# smooths away some high-frequency detail). Close enough that the official constants serve both.

PYTHON_TARBALL = "cifar-10-python.tar.gz"
BATCHES_DIR = "cifar-10-batches-py"
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LOSSY_SUFFIXES = (".jpg", ".jpeg")
# PIL modes with 8 bits a channel (converted to RGB); 16-bit and float images are refused.
_8BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar")
SPLITS = ("train", "test")
EXPECT_COUNTS = (5000, 1000)  # images per class in train and test

# Layout names (`Cifar10.layout`, `Cifar10Source.layout`) and how status and errors describe them.
LAYOUTS = {
    "python-tarball": "official python tarball",
    "python-batches": "extracted python batches",
    "image-tarball": "image-folder tarball",
    "image-folder": "image folder",
}

_CACHE_FORMAT = "llmlab-cifar10-cache-v1"
_CACHE_TENSORS = ("train_images", "train_labels", "test_images", "test_labels")

# md5s of the files inside the official tarball, as published with torchvision's `datasets.CIFAR10`.
_BATCH_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}


# ---------------------------------------------------------------------------------------------------------
# Finding the source
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cifar10Source:
    """Where CIFAR-10 was found: one of `LAYOUTS` and the file or folder it is read from."""

    layout: str  # a key of LAYOUTS
    path: Path

    def describe(self) -> str:
        return f"{LAYOUTS[self.layout]} {self.path}"


def _search_dirs(spec: DatasetSpec, root: Path) -> list[Path]:
    return [root / d for d in spec.subdirs] or [root]


def _known_file(spec: DatasetSpec, name: str) -> FileSpec | None:
    """The spec (with checksums) of a file the dataset knows by name, e.g. "cifar-10-python.tar.gz"."""
    for f in (*spec.files, *spec.alternatives):
        if f.name == name:
            return f
    return None


def _split_member(name: str) -> tuple[str, str, str, str] | None:
    """(top folder or "", split, class folder, file name) of an image-folder path, or None for other paths."""
    parts = [p for p in PurePosixPath(name).parts if p not in (".", "/")]
    if len(parts) not in (3, 4) or parts[-3] not in SPLITS:
        return None
    return ("/".join(parts[:-3]), parts[-3], parts[-2], parts[-1])


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def _first_image_in_tarball(path: Path) -> str | None:
    """The archive's first file if it is `[top/]train|test/<class>/<image>`, else None (reads the start)."""
    try:
        with tarfile.open(path, "r|*") as tf:
            for member in tf:
                if member.isfile():
                    parsed = _split_member(member.name)
                    return member.name if parsed is not None and _is_image_name(parsed[3]) else None
    except (OSError, EOFError, tarfile.TarError, zlib.error):
        return None  # not an archive, or a damaged one: not a candidate
    return None


def _first_image_in_folder(path: Path) -> str | None:
    """The first image of the first class folder of `path/train/`, when `path/test/` exists too."""
    train, test = path / "train", path / "test"
    if not (train.is_dir() and test.is_dir()):
        return None
    for class_dir in sorted(p for p in train.iterdir() if p.is_dir()):
        with os.scandir(class_dir) as it:
            return next((e.path for e in it if e.is_file() and _is_image_name(e.name)), None)
    return None


def _image_tarballs(spec: DatasetSpec, folder: Path) -> Iterator[Path]:
    # Files the spec knows by name are taken as they are (a damaged known copy must be reported as corrupt,
    # not skipped); any other archive must look like an image-folder tarball.
    known = [f.name for f in spec.alternatives if f.name.endswith(TARBALL_SUFFIXES) and "/" not in f.name]
    for name in known:
        if (folder / name).is_file():
            yield folder / name
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        name = path.name
        if (
            name.endswith(TARBALL_SUFFIXES)
            and name not in known
            and name != PYTHON_TARBALL
            and path.is_file()
            and _first_image_in_tarball(path) is not None
        ):
            yield path


def find_cifar10(root: str | Path | None = None, spec: DatasetSpec | None = None) -> Cifar10Source | None:
    """The first accepted layout under the data root (`root` > LLMLAB_DATA > ~/.cache/llmlab), or None.

    Order: python tarball, extracted batches, image-folder tarballs, image folders; each is looked for in
    `cifar10/` and then in the root itself.
    """
    spec = spec or CIFAR10
    dirs = _search_dirs(spec, data_root_source(root)[0])
    for d in dirs:
        if (d / PYTHON_TARBALL).is_file():
            return Cifar10Source("python-tarball", d / PYTHON_TARBALL)
    for d in dirs:
        if (d / BATCHES_DIR).is_dir():
            return Cifar10Source("python-batches", d / BATCHES_DIR)
    for d in dirs:
        for path in _image_tarballs(spec, d):
            return Cifar10Source("image-tarball", path)
    for d in dirs:
        below = sorted(p for p in d.iterdir() if p.is_dir()) if d.is_dir() else []
        for path in (d, *below):
            if _first_image_in_folder(path) is not None:
                return Cifar10Source("image-folder", path)
    return None


def _batch_files(spec: DatasetSpec) -> list[FileSpec]:
    names = (*TRAIN_BATCHES, TEST_BATCH, META_FILE)
    return [
        _known_file(spec, f"{BATCHES_DIR}/{n}") or FileSpec(f"{BATCHES_DIR}/{n}", raw=True) for n in names
    ]


def _source_files(spec: DatasetSpec, src: Cifar10Source) -> list[tuple[Path, FileSpec]]:
    """The files of a source that have (or could have) a checksum: what status reports and load verifies."""
    if src.layout == "python-batches":
        return [(src.path / PurePosixPath(f.name).name, f) for f in _batch_files(spec)]
    if src.layout == "image-folder":
        return []
    return [(src.path, _known_file(spec, src.path.name) or FileSpec(src.path.name, raw=True))]


def _inspect(spec: DatasetSpec, root: Path, verify: bool) -> tuple[str, list[FileStatus]]:
    """`DatasetSpec.inspect` for `dataset_status`: the layout found and the state of its files."""
    src = find_cifar10(root, spec)
    if src is None:
        return "", [file_status(None, f, spec.name, verify) for f in spec.files]
    layout = LAYOUTS[src.layout]
    if src.layout == "image-folder":
        files = [FileStatus(f"{s}/", src.path / s, None) for s in SPLITS]
        first = _first_image_in_folder(src.path)
    else:
        files = [
            file_status(path if path.is_file() else None, fspec, spec.name, verify)
            for path, fspec in _source_files(spec, src)
        ]
        first = _first_image_in_tarball(src.path) if src.layout == "image-tarball" else None
    if first and first.lower().endswith(LOSSY_SUFFIXES):
        layout += ", JPEG: lossy"
    return layout, files


def _verify_source(spec: DatasetSpec, src: Cifar10Source) -> None:
    files = _source_files(spec, src)
    missing = [path.name for path, _ in files if not path.is_file()]
    if missing:
        raise ValueError(
            f"CIFAR-10 {src.describe()}: {', '.join(missing)} missing; the folder must hold "
            f"{', '.join((*TRAIN_BATCHES, TEST_BATCH, META_FILE))} (extract {PYTHON_TARBALL} again)"
        )
    for path, fspec in files:
        verify_file(path, fspec, spec.name)


CIFAR10 = register_dataset(
    DatasetSpec(
        name="cifar10",
        description="CIFAR-10, 50000 train + 10000 test 32x32 colour images in 10 classes",
        # `cifar10/` is llmlab's layout; the root itself is where torchvision keeps its download.
        subdirs=("cifar10", ""),
        files=(FileSpec(PYTHON_TARBALL, size=170498071, md5="c58f30108f718f92721af3b95e74349a", raw=True),),
        alternatives=(
            # The lab's shared JPEG copy (see MANIFEST.md): sha256 of the .tar.gz bytes themselves.
            FileSpec(
                "cifar10_jpg.tar.gz",
                sha256="a065349f57c0e1b011ab0029aed4067ba8bf7372b1c004d553e7e756dbf905a1",
                size=19433027,
                raw=True,
            ),
            *(FileSpec(f"{BATCHES_DIR}/{n}", md5=m, raw=True) for n, m in _BATCH_MD5.items()),
        ),
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        citation="A. Krizhevsky, Learning Multiple Layers of Features from Tiny Images, tech. report, "
        "University of Toronto, 2009",
        license="no license stated on the dataset page; cite the tech report",
        inspect=_inspect,
    )
)


def _missing_error(spec: DatasetSpec, root: Path, root_source: str) -> DataMissingError:
    dirs = _search_dirs(spec, root)
    where = " then ".join(f"{d}/" for d in dirs)
    src = f" (from {root_source})" if root_source else ""
    known = [f.name for f in spec.alternatives if f.name.endswith(TARBALL_SUFFIXES) and "/" not in f.name]
    lines = [
        f"dataset {spec.name!r}: no accepted layout found under the data root {root}{src}.",
        f"Accepted layouts, looked for in {where} (the first found is used):",
        f"  1. the official python tarball {PYTHON_TARBALL} (md5-verified)",
        f"  2. its extracted folder {BATCHES_DIR}/ ({', '.join((*TRAIN_BATCHES, TEST_BATCH, META_FILE))})",
        "  3. an image-folder tarball (*.tar.gz, *.tgz, *.tar) holding [top/]train/<class>/*.png|jpg and "
        f"test/<class>/*.png|jpg{', e.g. ' + ', '.join(known) if known else ''} (JPEG copies are lossy)",
        "  4. an image folder train/<class>/*.png|jpg and test/<class>/*.png|jpg (or one folder below)",
        f"  classes: {', '.join(CIFAR10_CLASSES)}",
        f"Official source: {OFFICIAL_URL} (homepage {spec.homepage})",
        f"To fix: run `llmlab data status` to see what is found, then `llmlab data download {spec.name}` "
        f"(needs internet; writes {dirs[0]}/{PYTHON_TARBALL}), or put one of the layouts there by hand, "
        "or point LLMLAB_DATA (or --data-dir) at a folder that has it.",
    ]
    return DataMissingError("\n".join(lines), dataset=spec.name, missing=[PYTHON_TARBALL], root=root)


# ---------------------------------------------------------------------------------------------------------
# The python batches, through a restricted unpickler
# ---------------------------------------------------------------------------------------------------------


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:  # numpy >= 2 moved numpy.core to numpy._core; the official files name numpy.core
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct  # protocols 0-4
        allowed[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5 re-pickles
    return allowed


class RefusedGlobalError(pickle.UnpicklingError):
    """A pickle named a global that `BatchUnpickler` does not allow (the file may be malicious)."""


class BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batch files and nothing else.

    A pickle may name any importable callable (`os.system`, `builtins.eval`, ...) and the unpickler calls it,
    so `find_class` resolves only numpy's array reconstruction (`_reconstruct`, `ndarray`, `dtype`, and
    `_frombuffer` for protocol-5 re-pickles) and refuses every other global with RefusedGlobalError (an
    UnpicklingError), before anything is called. Plain data
    (dicts, lists, strings, ints) needs no globals.
    """

    _allowed: dict[tuple[str, str], Any] | None = None

    def __init__(self, file: IO[bytes], *, source: str = "") -> None:
        super().__init__(file, encoding="latin1")  # written by Python 2: its str holds the raw bytes
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if BatchUnpickler._allowed is None:
            BatchUnpickler._allowed = _numpy_globals()
        try:
            return BatchUnpickler._allowed[(module, name)]
        except KeyError:
            where = f" in {self.source}" if self.source else ""
            raise RefusedGlobalError(
                f"refused to load the global {module}.{name}{where}: a CIFAR-10 batch holds only numpy "
                "arrays and plain data, so this file is not an official batch and may be malicious "
                "(unpickling it would call that global). Delete it and use the official files."
            ) from None


def _unpickle(f: IO[bytes], source: str) -> dict[str, Any]:
    try:
        obj = BatchUnpickler(f, source=source).load()
    except RefusedGlobalError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        OSError,
    ) as e:
        raise ValueError(f"{source}: not a readable CIFAR-10 batch ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a pickled dict, found {type(obj).__name__}")
    # Python 2 str keys arrive as str with latin1; files re-pickled with encoding="bytes" may have bytes keys.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _batch_arrays(batch: dict[str, Any], source: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 3, 32, 32], labels int64 [n]) of one unpickled batch, checked."""
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{source}: 'data' must be a uint8 array [n, 3072] (32x32 RGB rows), found {found}")
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels.shape != (data.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise ValueError(
            f"{source}: 'labels' must be {data.shape[0]} ints in 0..9, found shape {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32), labels  # [n, 3072] -> [n, 3, 32, 32]: R, G, B planes, row-major


def _iter_batch_members(src: Cifar10Source) -> Iterator[tuple[str, IO[bytes]]]:
    """(file name, open stream) of every file of the batches, from the tarball (streamed) or the folder."""
    wanted = {*TRAIN_BATCHES, TEST_BATCH, META_FILE}
    if src.layout == "python-batches":
        for name in sorted(wanted):
            with open(src.path / name, "rb") as f:
                yield name, f
        return
    with tarfile.open(src.path, "r|*") as tf:
        for member in tf:
            name = PurePosixPath(member.name).name
            if member.isfile() and name in wanted:
                f = tf.extractfile(member)
                assert f is not None  # a regular file always has a stream
                yield name, f


def _decode_batches(src: Cifar10Source, progress: bool) -> Cifar10:
    from tqdm.auto import tqdm

    batches: dict[str, dict[str, Any]] = {}
    try:
        with tqdm(
            total=7,
            unit="file",
            desc="decoding CIFAR-10",
            disable=not (progress and progress_enabled()),
            leave=False,
        ) as bar:
            for name, f in _iter_batch_members(src):
                batches[name] = _unpickle(f, f"{src.path}:{name}" if src.layout == "python-tarball" else name)
                bar.update(1)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise ValueError(f"CIFAR-10 {src.describe()}: damaged archive ({e})") from e
    missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH, META_FILE) if n not in batches]
    if missing:
        raise ValueError(f"CIFAR-10 {src.describe()}: {', '.join(missing)} not found in it")
    names = batches[META_FILE].get("label_names")
    if list(names or []) != list(CIFAR10_CLASSES):
        raise ValueError(
            f"CIFAR-10 {src.describe()}: {META_FILE} label_names are {names}, "
            f"expected {list(CIFAR10_CLASSES)}"
        )
    train = [_batch_arrays(batches[n], n) for n in TRAIN_BATCHES]
    test_images, test_labels = _batch_arrays(batches[TEST_BATCH], TEST_BATCH)
    return _make(
        np.concatenate([x for x, _ in train]),
        np.concatenate([y for _, y in train]),
        test_images,
        test_labels,
        src,
        lossy=False,
    )


# ---------------------------------------------------------------------------------------------------------
# Image folders (in a folder or a tarball)
# ---------------------------------------------------------------------------------------------------------


def _class_index(class_name: str, where: str) -> int:
    try:
        return CIFAR10_CLASSES.index(class_name)
    except ValueError:
        raise ValueError(
            f"CIFAR-10 {where}: unknown class folder {class_name!r}; the class folders must be the official "
            f"CIFAR-10 classes {', '.join(CIFAR10_CLASSES)}"
        ) from None


def _image_entries_from_tarball(path: Path) -> list[tuple[str, int, str, bytes]]:
    entries = []
    top: str | None = None
    with tarfile.open(path, "r|*") as tf:
        for member in tf:
            parsed = _split_member(member.name) if member.isfile() else None
            if parsed is None or not _is_image_name(parsed[3]):
                continue
            prefix, split, class_name, name = parsed
            if top is None:
                top = prefix
            elif prefix != top:
                raise ValueError(
                    f"CIFAR-10 image-folder tarball {path}: images under two top folders ({top!r} and "
                    f"{prefix!r}); it must hold one train/ and one test/ tree"
                )
            label = _class_index(class_name, f"image-folder tarball {path} ({member.name})")
            f = tf.extractfile(member)
            assert f is not None
            entries.append((split, label, name, f.read()))
    return entries


def _image_entries_from_folder(path: Path) -> list[tuple[str, int, str, bytes]]:
    entries = []
    for split in SPLITS:
        for class_dir in sorted(p for p in (path / split).iterdir() if p.is_dir()):
            label = _class_index(class_dir.name, f"image folder {path} ({class_dir})")
            for f in sorted(class_dir.iterdir()):
                if f.is_file() and _is_image_name(f.name):
                    entries.append((split, label, f.name, f.read_bytes()))
    return entries


def _decode_image(data: bytes, where: str) -> np.ndarray:
    """uint8 [32, 32, 3] of one PNG/JPEG; grayscale, palette and RGBA images are converted to RGB (alpha is
    dropped, as PIL's convert("RGB") does)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.size != (32, 32):  # checked before decoding anything
                raise ValueError(
                    f"CIFAR-10 {where}: image is {image.size[0]}x{image.size[1]}, expected 32x32"
                )
            if image.mode not in _8BIT_MODES:
                raise ValueError(f"CIFAR-10 {where}: pixel mode {image.mode}; expected 8-bit images")
            return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # PIL's errors for damaged or unknown files
        raise ValueError(f"CIFAR-10 {where}: cannot decode the image ({e})") from e


def _decode_images(src: Cifar10Source, progress: bool) -> Cifar10:
    import torch
    from tqdm.auto import tqdm

    if src.layout == "image-tarball":
        try:
            entries = _image_entries_from_tarball(src.path)
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise ValueError(f"CIFAR-10 {src.describe()}: damaged archive ({e})") from e
    else:
        entries = _image_entries_from_folder(src.path)
    # A fixed order, whatever the archive's or file system's: split, class (official order), file name.
    entries.sort(key=lambda e: (SPLITS.index(e[0]), e[1], e[2]))
    n_train = sum(e[0] == "train" for e in entries)
    hwc = np.empty((len(entries), 32, 32, 3), dtype=np.uint8)  # [N, H, W, C], as images are stored
    labels = np.array([e[1] for e in entries], dtype=np.int64)
    for i, (split, label, name, data) in enumerate(
        tqdm(
            entries,
            unit="img",
            desc="decoding CIFAR-10",
            disable=not (progress and progress_enabled()),
            leave=False,
        )
    ):
        hwc[i] = _decode_image(data, f"{src.describe()} ({split}/{CIFAR10_CLASSES[label]}/{name})")
    images = torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()  # [N, H, W, C] -> [N, C, H, W]
    labels = torch.from_numpy(labels)
    lossy = any(e[2].lower().endswith(LOSSY_SUFFIXES) for e in entries)
    return _make(images[:n_train], labels[:n_train], images[n_train:], labels[n_train:], src, lossy)


# ---------------------------------------------------------------------------------------------------------
# The dataset, its cache, and the loader
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Cifar10:
    """CIFAR-10 as uint8 tensors (not normalised: see CIFAR10_MEAN/CIFAR10_STD and llmlab.data.augment)."""

    train_images: torch.Tensor  # uint8 [50000, 3, 32, 32] (NCHW, RGB)
    train_labels: torch.Tensor  # int64 [50000], 0..9 indexing `classes`
    test_images: torch.Tensor  # uint8 [10000, 3, 32, 32]
    test_labels: torch.Tensor  # int64 [10000]
    classes: list[str]
    source: str  # the file or folder read
    layout: str  # a key of LAYOUTS
    lossy: bool  # decoded from JPEG: pixels differ from the official bytes, and reports must say so

    def description(self) -> str:
        n, m = len(self.train_labels), len(self.test_labels)
        kind = "JPEG, lossy: pixels differ from the official bytes" if self.lossy else "lossless"
        return (
            f"CIFAR-10 {n} train + {m} test 32x32 RGB from the {LAYOUTS[self.layout]} {self.source} ({kind})"
        )


def _make(train_x, train_y, test_x, test_y, src: Cifar10Source, lossy: bool) -> Cifar10:
    import torch

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a.contiguous()

    return Cifar10(
        t(train_x),
        t(train_y).to(torch.int64),
        t(test_x),
        t(test_y).to(torch.int64),
        list(CIFAR10_CLASSES),
        str(src.path),
        src.layout,
        lossy,
    )


def _decode(src: Cifar10Source, progress: bool = True) -> Cifar10:
    """Read and decode a source (the slow path; `load_cifar10` caches its result)."""
    if src.layout in ("python-tarball", "python-batches"):
        return _decode_batches(src, progress)
    return _decode_images(src, progress)


def _fingerprint(src: Cifar10Source) -> str:
    """A key that changes when the source does: its path, layout, and (name, size, mtime_ns) of its files."""
    h = hashlib.sha256(json.dumps([_CACHE_FORMAT, src.layout, str(src.path.resolve())]).encode())
    if src.path.is_file():
        files = [src.path]
    else:
        folders = [src.path] if src.layout == "python-batches" else [src.path / s for s in SPLITS]
        files = sorted(p for folder in folders for p in folder.rglob("*") if p.is_file())
    for p in files:
        st = p.stat()
        h.update(
            f"{p.relative_to(src.path) if p != src.path else ''}\0{st.st_size}\0{st.st_mtime_ns}\n".encode()
        )
    return h.hexdigest()


def _cache_path(src: Cifar10Source, key: str) -> Path:
    where = hashlib.sha256(str(src.path.resolve()).encode()).hexdigest()[:12]
    return cache_dir() / "cifar10" / f"{src.layout}-{where}-{key[:16]}.safetensors"


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().numpy().view(np.uint8).reshape(-1).data)


def _read_cache(path: Path, key: str) -> Cifar10 | None:
    """The cached dataset, or None if there is none; a damaged or foreign file is deleted (rebuilt later)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _CACHE_FORMAT or meta.get("key") != key:
                raise ValueError("written for another source or format")
            tensors = {name: f.get_tensor(name) for name in _CACHE_TENSORS}
        crcs = json.loads(meta["crc32"])
        for name, t in tensors.items():
            if _crc(t) != crcs[name]:
                raise ValueError(f"crc32 of {name} does not match")
        data = Cifar10(
            **tensors,
            classes=json.loads(meta["classes"]),
            source=meta["source"],
            layout=meta["layout"],
            lossy=meta["lossy"] == "1",
        )
        _check_structure(data)
        return data
    except Exception as e:  # whatever is wrong with a cache file (header, bytes), the cure is a rebuild
        warnings.warn(f"ignoring a damaged CIFAR-10 cache {path} ({e}); decoding again", stacklevel=3)
        path.unlink(missing_ok=True)
        return None


def _write_cache(path: Path, data: Cifar10, key: str) -> None:
    """Write atomically (temp file, fsync, rename) and drop older caches of the same source."""
    from safetensors.torch import save_file

    tensors = {name: getattr(data, name).contiguous() for name in _CACHE_TENSORS}
    meta = {
        "format": _CACHE_FORMAT,
        "key": key,
        "source": data.source,
        "layout": data.layout,
        "lossy": "1" if data.lossy else "0",
        "classes": json.dumps(data.classes),
        "crc32": json.dumps({name: _crc(t) for name, t in tensors.items()}),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=meta)
        stem = path.name.rsplit("-", 1)[0]
        for old in path.parent.glob(f"{stem}-*.safetensors"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as e:  # the cache is an optimisation: a read-only cache dir only costs time
        warnings.warn(f"could not write the CIFAR-10 cache {path}: {e}", stacklevel=3)


def _check_structure(d: Cifar10) -> None:
    import torch

    for split, x, y in (("train", d.train_images, d.train_labels), ("test", d.test_images, d.test_labels)):
        if x.dtype != torch.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != (3, 32, 32):
            raise ValueError(
                f"CIFAR-10 {split} images: expected uint8 [n, 3, 32, 32], got {x.dtype} {x.shape}"
            )
        if y.dtype != torch.int64 or y.shape != (x.shape[0],):
            raise ValueError(
                f"CIFAR-10 {split} labels: expected int64 [{x.shape[0]}], got {y.dtype} {y.shape}"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > 9):
            raise ValueError(f"CIFAR-10 {split} labels: values outside 0..9")
    if d.classes != list(CIFAR10_CLASSES):
        raise ValueError(f"CIFAR-10 classes {d.classes}, expected {list(CIFAR10_CLASSES)}")


def _check_counts(d: Cifar10, expect_counts: tuple[int, int]) -> None:
    import torch

    for split, y, n in (
        ("train", d.train_labels, expect_counts[0]),
        ("test", d.test_labels, expect_counts[1]),
    ):
        counts = torch.bincount(y, minlength=10).tolist()
        if counts != [n] * 10:
            found = ", ".join(f"{c}={k}" for c, k in zip(d.classes, counts, strict=True))
            raise ValueError(
                f"CIFAR-10 {split} from {d.source}: {len(y)} images ({found}); expected {n} per class "
                f"({10 * n} in all). The copy is incomplete or not CIFAR-10 (to load a subset on purpose, "
                "pass expect_counts=None)."
            )


def load_cifar10(
    root: str | Path | None = None,
    *,
    verify: bool = True,
    expect_counts: tuple[int, int] | None = EXPECT_COUNTS,
    progress: bool = True,
    spec: DatasetSpec | None = None,
) -> Cifar10:
    """CIFAR-10 as uint8 tensors, decoded once and then read from the cache in `cache_dir()/cifar10/`.

    Looks under the data root (`root` > LLMLAB_DATA > ~/.cache/llmlab) for the layouts listed in this module's
    docstring and raises DataMissingError naming them all when none is found. With `verify`, the source's
    files are checked against their published checksums (cached by the store, so only the first load hashes)
    and DataCorruptError is raised on a mismatch. `expect_counts` = images per class in (train, test), checked
    on every load (None skips it, for subsets). `progress` shows a bar while decoding. `spec` replaces the
    registered CIFAR10 spec (its checksums and search folders), e.g. in tests. Images are ordered by split,
    then as in the source: batch order for the python layouts, class (official order) then file name for
    image folders; so the same source always gives the same tensors.
    """
    spec = spec or CIFAR10
    root_path, root_source = data_root_source(root)
    src = find_cifar10(root_path, spec)
    if src is None:
        raise _missing_error(spec, root_path, root_source)
    if verify:
        _verify_source(spec, src)
    key = _fingerprint(src)
    path = _cache_path(src, key)
    data = _read_cache(path, key)
    if data is None:
        data = _decode(src, progress)
        _check_structure(data)
        if expect_counts is not None:
            _check_counts(data, expect_counts)  # before writing: a wrong source leaves no 180 MB file behind
        _write_cache(path, data, key)
    elif expect_counts is not None:
        _check_counts(data, expect_counts)
    return data


def dataset_mean_std(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images [N, C, H, W] scaled to [0, 1].

    Exact: computed in float64 from each channel's 256-bin histogram.
    """
    import torch

    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)  # [256]
        p = hist / hist.sum()
        mean = float((p * values).sum())
        means.append(mean)
        stds.append(float((p * (values - mean) ** 2).sum().sqrt()))
    return tuple(means), tuple(stds)
