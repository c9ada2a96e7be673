"""CIFAR-10: every accepted layout built small in tmp_path, the restricted unpickler, checksums, the decode
cache, status and download (over loopback), and the shared JPEG copy (LLMLAB_DATA)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llmlab.data import cifar10
from llmlab.data.cifar10 import (
    BATCHES_DIR,
    CIFAR10,
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    PYTHON_TARBALL,
    BatchUnpickler,
    RefusedGlobalError,
    dataset_mean_std,
    find_cifar10,
    load_cifar10,
)
from llmlab.data.store import (
    DataCorruptError,
    DataDownloadError,
    DataMissingError,
    DatasetSpec,
    FileSpec,
    dataset_status,
    download_dataset,
    format_status,
    verify_file,
)
from tests.data.test_store import dead_url, serve

SMALL = (3, 1)  # images per class in the synthetic train and test splits


# ---------------------------------------------------------------------------------------------------------
# Synthetic data in the published formats
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Synth:
    train_x: np.ndarray  # uint8 [30, 3, 32, 32]
    train_y: np.ndarray  # int64 [30]
    test_x: np.ndarray  # uint8 [10, 3, 32, 32]
    test_y: np.ndarray


def _synth(seed: int = 0) -> Synth:
    rng = np.random.default_rng(seed)
    n_train, n_test = 10 * SMALL[0], 10 * SMALL[1]
    return Synth(
        rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8),
        rng.permutation(np.arange(n_train) % 10).astype(np.int64),
        rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8),
        rng.permutation(np.arange(n_test) % 10).astype(np.int64),
    )


class Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle did for the official batches (protocol 2): byte and text strings as
    py2 `str` (BINSTRING opcodes, read back with encoding="latin1") and numpy's reconstructor named
    `numpy.core.multiarray._reconstruct`."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def py2_dumps(obj) -> bytes:
    f = io.BytesIO()
    Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue()


def _batch_files(s: Synth, dumps=py2_dumps) -> dict[str, bytes]:
    """The official dicts: data_batch_1..5 (the train images in 5 parts), test_batch, batches.meta."""
    files = {}
    parts = np.array_split(np.arange(len(s.train_y)), 5)
    for i, idx in enumerate(parts, start=1):
        files[f"data_batch_{i}"] = dumps(
            {
                "batch_label": f"training batch {i} of 5",
                "labels": s.train_y[idx].tolist(),
                "data": s.train_x[idx].reshape(len(idx), 3072),
                "filenames": [f"img_{j:05d}.png" for j in idx],
            }
        )
    files["test_batch"] = dumps(
        {
            "batch_label": "testing batch 1 of 1",
            "labels": s.test_y.tolist(),
            "data": s.test_x.reshape(-1, 3072),
            "filenames": [f"test_{j:05d}.png" for j in range(len(s.test_y))],
        }
    )
    files["batches.meta"] = dumps(
        {"num_cases_per_batch": 6, "label_names": list(CIFAR10_CLASSES), "num_vis": 3072}
    )
    return files


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_python_tarball(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        _add(tf, f"{BATCHES_DIR}/readme.html", b"<html>CIFAR-10</html>")
        for name, data in files.items():
            _add(tf, f"{BATCHES_DIR}/{name}", data)
    return path


def write_batches_dir(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def write_image_folder(root: Path, s: Synth, suffix: str = ".png") -> tuple[np.ndarray, ...]:
    """train/<class>/NNNN.png and test/<class>/NNNN.png; image 0 of train is grayscale, image 1 RGBA (PNG).

    Returns the expected (train_x, train_y, test_x, test_y) in load order (class, then file name), with the
    pixels PIL reads back as RGB (the truth for the lossy and converted images).
    """
    out = []
    for split, x, y in (("train", s.train_x, s.train_y), ("test", s.test_x, s.test_y)):
        entries = []
        for i in range(len(y)):
            path = root / split / CIFAR10_CLASSES[y[i]] / f"{i:04d}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            hwc = x[i].transpose(1, 2, 0)  # [3, 32, 32] -> [32, 32, 3]
            if split == "train" and i == 0:
                image = Image.fromarray(hwc[:, :, 0], mode="L")
            elif split == "train" and i == 1 and suffix == ".png":  # JPEG has no alpha
                image = Image.fromarray(np.dstack([hwc, np.full((32, 32), 77, np.uint8)]), mode="RGBA")
            else:
                image = Image.fromarray(hwc, mode="RGB")
            image.save(path, quality=90) if suffix == ".jpg" else image.save(path)
            with Image.open(path) as back:
                rgb = np.asarray(back.convert("RGB")).transpose(2, 0, 1)
            entries.append((int(y[i]), path.name, rgb))
        entries.sort(key=lambda e: (e[0], e[1]))
        out += [np.stack([e[2] for e in entries]), np.array([e[0] for e in entries], dtype=np.int64)]
    return tuple(out)


def tar_folder(src: Path, path: Path, top: str = "") -> Path:
    with tarfile.open(path, "w:gz") as tf:
        tf.add(src / "train", arcname=f"{top}train" if top else "train")
        tf.add(src / "test", arcname=f"{top}test" if top else "test")
    return path


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def spec_with_md5(path: Path) -> DatasetSpec:
    """The CIFAR-10 spec with the python tarball's md5 and size replaced by those of `path`."""
    tarball = dataclasses.replace(CIFAR10.files[0], md5=md5_of(path), size=path.stat().st_size)
    return dataclasses.replace(CIFAR10, files=(tarball,))


def assert_matches(data: cifar10.Cifar10, train_x, train_y, test_x, test_y) -> None:
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
    assert data.train_images.shape == (len(train_y), 3, 32, 32)
    assert torch.equal(data.train_images, torch.from_numpy(train_x))
    assert torch.equal(data.train_labels, torch.from_numpy(train_y))
    assert torch.equal(data.test_images, torch.from_numpy(test_x))
    assert torch.equal(data.test_labels, torch.from_numpy(test_y))
    assert data.classes == list(CIFAR10_CLASSES)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private derived-cache folder for this test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("LLMLAB_CACHE", str(folder))
    return folder


def _files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------------
# The restricted unpickler
# ---------------------------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_unpickler_refuses_malicious_pickles(tmp_path, protocol):
    marker = tmp_path / "pwned"
    for evil, name in ((_Evil(marker), "system"), (_EvalEvil(), r"builtin\w*\.eval")):
        payload = pickle.dumps({"data": evil}, protocol=protocol)
        with pytest.raises(RefusedGlobalError, match=f"refused to load the global .*{name}"):
            BatchUnpickler(io.BytesIO(payload), source="evil").load()
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Evil(marker), protocol=protocol))  # the payload is real: plain pickle runs it
    assert marker.exists()


def test_unpickler_reads_numpy_arrays_in_every_protocol():
    a = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    for payload in [py2_dumps({"data": a})] + [pickle.dumps({"data": a}, protocol=p) for p in (3, 4, 5)]:
        out = BatchUnpickler(io.BytesIO(payload)).load()
        np.testing.assert_array_equal(out["data"], a)
    # a py3 protocol-2 pickle encodes bytes through _codecs.encode: not in the official files, refused
    with pytest.raises(RefusedGlobalError, match="_codecs.encode"):
        BatchUnpickler(io.BytesIO(pickle.dumps({"data": a}, protocol=2))).load()


def test_malicious_batch_in_a_tarball_is_refused(tmp_path, cache):
    marker = tmp_path / "pwned"
    files = _batch_files(_synth())
    files["data_batch_3"] = pickle.dumps({"data": _Evil(marker), "labels": []}, protocol=2)
    write_python_tarball(tmp_path / "root" / "cifar10" / PYTHON_TARBALL, files)
    with pytest.raises(pickle.UnpicklingError, match="refused .* in .*data_batch_3"):
        load_cifar10(tmp_path / "root", verify=False, expect_counts=SMALL, progress=False)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# The python layouts
# ---------------------------------------------------------------------------------------------------------


def test_python_tarball_official_format(tmp_path, cache):
    s = _synth()
    path = write_python_tarball(tmp_path / "cifar10" / PYTHON_TARBALL, _batch_files(s))
    data = load_cifar10(tmp_path, spec=spec_with_md5(path), expect_counts=SMALL, progress=False)
    assert_matches(data, s.train_x, s.train_y, s.test_x, s.test_y)
    assert data.layout == "python-tarball" and data.source == str(path) and not data.lossy
    assert "lossless" in data.description() and "official python tarball" in data.description()


def test_python_tarball_md5_is_checked(tmp_path, cache):
    path = write_python_tarball(tmp_path / "cifar10" / PYTHON_TARBALL, _batch_files(_synth()))
    with pytest.raises(DataCorruptError) as info:
        load_cifar10(tmp_path, expect_counts=SMALL, progress=False)  # the official md5
    msg = str(info.value)
    assert "md5 of the file" in msg and "c58f30108f718f92721af3b95e74349a" in msg and md5_of(path) in msg
    assert "llmlab data download cifar10" in msg
    assert not list((cache / "cifar10").glob("*.safetensors"))  # refused before decoding
    st = dataset_status("cifar10", tmp_path)
    assert st.state == "corrupt" and st.layout == "official python tarball" and st.files[0].ok is False
    assert "corrupt" in format_status([st])
    assert dataset_status(spec_with_md5(path), tmp_path).state == "present"
    # without verification it loads
    assert (
        load_cifar10(tmp_path, verify=False, expect_counts=SMALL, progress=False).layout == "python-tarball"
    )


def test_extracted_batches(tmp_path, cache):
    s = _synth(1)
    folder = write_batches_dir(tmp_path / BATCHES_DIR, _batch_files(s))  # torchvision's layout, in the root
    assert find_cifar10(tmp_path) == cifar10.Cifar10Source("python-batches", folder)
    with pytest.raises(DataCorruptError, match="data_batch_1"):  # the published md5s of the real batches
        load_cifar10(tmp_path, expect_counts=SMALL, progress=False)
    data = load_cifar10(tmp_path, verify=False, expect_counts=SMALL, progress=False)
    assert_matches(data, s.train_x, s.train_y, s.test_x, s.test_y)
    assert data.layout == "python-batches" and not data.lossy
    st = dataset_status("cifar10", tmp_path, verify=False)
    assert st.state == "present" and st.layout == "extracted python batches" and len(st.files) == 7
    (folder / "test_batch").unlink()
    assert dataset_status("cifar10", tmp_path, verify=False).state == "partial"
    with pytest.raises(ValueError, match="test_batch missing"):
        load_cifar10(tmp_path, expect_counts=SMALL, progress=False)


def test_bad_batches_are_clear_errors(tmp_path, cache):
    s = _synth()
    files = _batch_files(s)
    files["batches.meta"] = py2_dumps({"label_names": ["cat", "dog"]})
    write_batches_dir(tmp_path / BATCHES_DIR, files)
    with pytest.raises(ValueError, match="label_names"):
        load_cifar10(tmp_path, verify=False, expect_counts=SMALL, progress=False)
    files = _batch_files(s)
    files["data_batch_2"] = py2_dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]})
    write_batches_dir(tmp_path / BATCHES_DIR, files)
    with pytest.raises(ValueError, match=r"data_batch_2: 'data' must be a uint8 array \[n, 3072\]"):
        load_cifar10(tmp_path, verify=False, expect_counts=SMALL, progress=False)
    files["data_batch_2"] = b"garbage, not a pickle"
    write_batches_dir(tmp_path / BATCHES_DIR, files)
    with pytest.raises(ValueError, match="data_batch_2: not a readable CIFAR-10 batch"):
        load_cifar10(tmp_path, verify=False, expect_counts=SMALL, progress=False)


def test_counts_are_checked(tmp_path, cache):
    s = _synth()
    path = write_python_tarball(tmp_path / "cifar10" / PYTHON_TARBALL, _batch_files(s))
    spec = spec_with_md5(path)
    with pytest.raises(ValueError, match=r"train from .*: 30 images .* expected 5000 per class"):
        load_cifar10(tmp_path, spec=spec, progress=False)  # the real counts
    assert not list((cache / "cifar10").glob("*.safetensors"))  # a wrong source leaves no cache behind
    data = load_cifar10(tmp_path, spec=spec, expect_counts=None, progress=False)
    assert len(data.train_labels) == 30


# ---------------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------------


def test_image_folder_png(tmp_path, cache):
    s = _synth(2)
    expected = write_image_folder(tmp_path / "cifar10", s)
    data = load_cifar10(tmp_path, expect_counts=SMALL, progress=False)
    assert_matches(data, *expected)
    assert data.layout == "image-folder" and data.source == str(tmp_path / "cifar10") and not data.lossy
    # grayscale and RGBA were converted to RGB: the first train image of its class is the gray one
    gray = int(np.flatnonzero(expected[1] == s.train_y[0])[0])
    x = data.train_images[gray]
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    st = dataset_status("cifar10", tmp_path)
    assert st.state == "present" and st.layout == "image folder"
    assert [f.name for f in st.files] == ["train/", "test/"] and all(f.ok is None for f in st.files)


def test_image_folder_one_level_below_and_tarball_with_top_folder(tmp_path, cache):
    s = _synth(3)
    expected = write_image_folder(tmp_path / "src" / "cifar10_png", s)
    # an extracted copy one folder below cifar10/
    folder_root = tmp_path / "a"
    (folder_root / "cifar10").mkdir(parents=True)
    (folder_root / "cifar10" / "cifar10_png").symlink_to(tmp_path / "src" / "cifar10_png")
    assert_matches(load_cifar10(folder_root, expect_counts=SMALL, progress=False), *expected)
    # the same tree in a tarball under a top folder, in the root itself
    tar_root = tmp_path / "b"
    tar_root.mkdir()
    archive = tar_folder(
        tmp_path / "src" / "cifar10_png", tar_root / "cifar10_png.tar.gz", top="cifar10_png/"
    )
    data = load_cifar10(tar_root, expect_counts=SMALL, progress=False)
    assert_matches(data, *expected)
    assert data.layout == "image-tarball" and data.source == str(archive) and not data.lossy
    st = dataset_status("cifar10", tar_root)
    assert st.state == "present" and st.layout == "image-folder tarball" and st.files[0].ok is None


def test_jpeg_tarball_is_lossy_and_known_name_is_checked(tmp_path, cache):
    s = _synth(4)
    train_x, train_y, test_x, test_y = write_image_folder(tmp_path / "src", s, suffix=".jpg")
    root = tmp_path / "root"
    (root / "cifar10").mkdir(parents=True)
    tar_folder(tmp_path / "src", root / "cifar10" / "my_jpegs.tgz")
    data = load_cifar10(root, expect_counts=SMALL, progress=False)
    assert data.lossy and "lossy" in data.description()
    assert dataset_status("cifar10", root).layout == "image-folder tarball, JPEG: lossy"
    assert torch.equal(data.train_labels, torch.from_numpy(train_y))
    assert torch.equal(data.train_images, torch.from_numpy(train_x))  # what PIL decodes
    assert torch.equal(data.test_images, torch.from_numpy(test_x))
    # under the name of the shared copy, the archive's sha256 (of its compressed bytes) is checked
    (root / "cifar10" / "my_jpegs.tgz").rename(root / "cifar10" / "cifar10_jpg.tar.gz")
    with pytest.raises(DataCorruptError, match="sha256 of the file .*a065349f57c0e1b011ab"):
        load_cifar10(root, expect_counts=SMALL, progress=False)
    assert dataset_status("cifar10", root).state == "corrupt"


def test_unknown_class_folder(tmp_path, cache):
    write_image_folder(tmp_path / "cifar10", _synth())
    (tmp_path / "cifar10" / "train" / "cat").rename(tmp_path / "cifar10" / "train" / "kitten")
    with pytest.raises(ValueError, match=r"unknown class folder 'kitten'.*airplane, automobile"):
        load_cifar10(tmp_path, expect_counts=SMALL, progress=False)


def test_wrong_image_size(tmp_path, cache):
    write_image_folder(tmp_path / "cifar10", _synth())
    bad = sorted((tmp_path / "cifar10" / "test" / "ship").iterdir())[0]
    Image.new("RGB", (30, 32)).save(bad)
    with pytest.raises(ValueError, match=rf"{bad.name}\): image is 30x32, expected 32x32"):
        load_cifar10(tmp_path, expect_counts=SMALL, progress=False)


# ---------------------------------------------------------------------------------------------------------
# Search order, missing data
# ---------------------------------------------------------------------------------------------------------


def test_search_order_prefers_lossless_sources(tmp_path):
    s = _synth()
    write_image_folder(tmp_path / "cifar10", s)
    assert find_cifar10(tmp_path).layout == "image-folder"
    tar_folder(tmp_path / "cifar10", tmp_path / "cifar10" / "x.tar.gz")
    assert find_cifar10(tmp_path).layout == "image-tarball"
    write_batches_dir(tmp_path / BATCHES_DIR, _batch_files(s))  # the root itself, but a better layout
    assert find_cifar10(tmp_path).layout == "python-batches"
    write_python_tarball(tmp_path / PYTHON_TARBALL, _batch_files(s))
    assert find_cifar10(tmp_path) == cifar10.Cifar10Source("python-tarball", tmp_path / PYTHON_TARBALL)


def test_missing_names_every_layout(tmp_path, monkeypatch):
    # things that are not CIFAR-10 must not be taken for it
    (tmp_path / "cifar10").mkdir()
    with tarfile.open(tmp_path / "aclImdb_v1.tar.gz", "w:gz") as tf:
        _add(tf, "aclImdb/train/neg/0_3.txt", b"a review")
    (tmp_path / "cifar10" / "notes.tar.gz").write_bytes(gzip.compress(b"not a tar"))
    for split in ("train", "test"):
        (tmp_path / "aclImdb" / split / "pos").mkdir(parents=True)
        (tmp_path / "aclImdb" / split / "pos" / "1_7.txt").write_text("great")
    monkeypatch.setenv("LLMLAB_DATA", str(tmp_path))
    assert find_cifar10() is None
    with pytest.raises(DataMissingError) as info:
        load_cifar10(progress=False)
    msg = str(info.value)
    for needle in (
        PYTHON_TARBALL,
        BATCHES_DIR,
        "image-folder tarball",
        "train/<class>/*.png|jpg",
        "cifar10_jpg.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "llmlab data download cifar10",
        "llmlab data status",
        "env LLMLAB_DATA",
        str(tmp_path / "cifar10"),
    ):
        assert needle in msg, needle
    assert info.value.dataset == "cifar10" and info.value.missing == [PYTHON_TARBALL]
    st = dataset_status("cifar10")
    assert st.state == "missing" and st.layout == "" and st.target == tmp_path / "cifar10"
    assert "llmlab data download cifar10" in format_status([st])


# ---------------------------------------------------------------------------------------------------------
# The decode cache
# ---------------------------------------------------------------------------------------------------------


def test_cache_is_used_and_follows_the_source(tmp_path, cache, monkeypatch):
    s = _synth()
    expected = write_image_folder(tmp_path / "cifar10", s)
    calls = []
    real_decode = cifar10._decode
    monkeypatch.setattr(cifar10, "_decode", lambda *a, **k: calls.append(a[0]) or real_decode(*a, **k))
    first = load_cifar10(tmp_path, expect_counts=SMALL, progress=False)
    cached = _files_under(cache / "cifar10")
    assert len(calls) == 1 and len(cached) == 1 and cached[0].suffix == ".safetensors"
    second = load_cifar10(tmp_path, expect_counts=SMALL, progress=False)
    assert len(calls) == 1
    assert_matches(second, *expected)
    assert (second.source, second.layout, second.lossy) == (first.source, first.layout, first.lossy)
    # a changed file is decoded again, and the stale cache file is dropped
    img = sorted((tmp_path / "cifar10" / "train" / "dog").iterdir())[0]
    Image.new("RGB", (32, 32), (1, 2, 3)).save(img)
    third = load_cifar10(tmp_path, expect_counts=SMALL, progress=False)
    assert len(calls) == 2 and len(_files_under(cache / "cifar10")) == 1
    dog = CIFAR10_CLASSES.index("dog")
    first_dog = int(torch.nonzero(third.train_labels == dog)[0])
    assert third.train_images[first_dog, :, 0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("damage", ["truncate", "garble-header", "flip-pixel", "empty"])
def test_corrupt_cache_is_rebuilt(tmp_path, cache, monkeypatch, damage):
    s = _synth()
    path = write_python_tarball(tmp_path / "cifar10" / PYTHON_TARBALL, _batch_files(s))
    spec = spec_with_md5(path)
    load_cifar10(tmp_path, spec=spec, expect_counts=SMALL, progress=False)
    (cached,) = _files_under(cache / "cifar10")
    raw = bytearray(cached.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "garble-header":
        raw[10:20] = b"\xff" * 10
    elif damage == "flip-pixel":
        raw[-5000] ^= 0x01  # inside the tensor data: only the crc32 notices
    else:
        raw = bytearray()
    cached.write_bytes(bytes(raw))
    calls = []
    real_decode = cifar10._decode
    monkeypatch.setattr(cifar10, "_decode", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    with pytest.warns(UserWarning, match="damaged CIFAR-10 cache"):
        data = load_cifar10(tmp_path, spec=spec, expect_counts=SMALL, progress=False)
    assert calls == [1]
    assert_matches(data, s.train_x, s.train_y, s.test_x, s.test_y)
    load_cifar10(tmp_path, spec=spec, expect_counts=SMALL, progress=False)  # rebuilt: no warning, no decode
    assert calls == [1]


# ---------------------------------------------------------------------------------------------------------
# Store extensions: raw-file checksums
# ---------------------------------------------------------------------------------------------------------


def test_raw_file_checksums_are_of_the_stored_bytes(tmp_path):
    data = gzip.compress(b"payload" * 100, mtime=0)
    path = tmp_path / "archive.tar.gz"
    path.write_bytes(data)
    sha, md5 = hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()
    assert verify_file(path, FileSpec("archive.tar.gz", sha256=sha, size=len(data), raw=True)) == sha
    assert verify_file(path, FileSpec("archive.tar.gz", md5=md5, raw=True)) == md5
    assert (
        verify_file(path, FileSpec("archive.tar.gz", md5="0" * 32, sha256=sha, raw=True)) == sha
    )  # sha wins
    assert verify_file(path, FileSpec("archive.tar.gz", raw=True)) == ""  # nothing known to check
    content = hashlib.sha256(b"payload" * 100).hexdigest()
    with pytest.raises(DataCorruptError, match="sha256 of the file"):  # raw: not the decompressed content
        verify_file(path, FileSpec("archive.tar.gz", sha256=content, raw=True))
    assert verify_file(path, FileSpec("archive.tar", sha256=content)) == content  # the default: content
    with pytest.raises(DataCorruptError, match="md5 of the file is " + md5):
        verify_file(path, FileSpec("archive.tar.gz", md5="0" * 32, raw=True))
    assert FileSpec("x.tar.gz", raw=True).remote_name == "x.tar.gz" and FileSpec("x").remote_name == "x.gz"


# ---------------------------------------------------------------------------------------------------------
# Download over a loopback HTTP server
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def test_download_fake_tarball_over_loopback(tmp_path, cache, no_proxy, monkeypatch):
    s = _synth()
    served = write_python_tarball(tmp_path / "served" / PYTHON_TARBALL, _batch_files(s))
    spec = spec_with_md5(served)
    root = tmp_path / "root"
    with serve(served.parent) as url:
        # the official md5 does not match the fake: refused, nothing left behind
        with pytest.raises(DataDownloadError, match="md5 of the file"):
            download_dataset("cifar10", root, mirrors=[url], progress=False)
        assert _files_under(root) == []
        out = download_dataset(spec, root, mirrors=[dead_url(), url], progress=False)
        assert out == root / "cifar10"
        assert _files_under(root) == [root / "cifar10" / PYTHON_TARBALL]
        # the env override names the mirror too
        monkeypatch.setenv("LLMLAB_MIRROR_CIFAR10", url)
        assert download_dataset(spec, tmp_path / "root2", progress=False) == tmp_path / "root2" / "cifar10"
    st = dataset_status(spec, root)
    assert st.state == "present" and st.layout == "official python tarball" and st.files[0].ok
    data = load_cifar10(root, spec=spec, expect_counts=SMALL, progress=False)
    assert_matches(data, s.train_x, s.train_y, s.test_x, s.test_y)
    # present and verified: a second download fetches nothing (every mirror is dead)
    assert download_dataset(spec, root, mirrors=[dead_url()], progress=False) == root / "cifar10"


def test_spec_registration():
    from llmlab.data import DATASETS

    assert DATASETS["cifar10"] is CIFAR10
    assert (
        CIFAR10.files[0].name == PYTHON_TARBALL and CIFAR10.files[0].md5 == "c58f30108f718f92721af3b95e74349a"
    )
    assert CIFAR10.files[0].size == 170498071 and CIFAR10.files[0].raw
    assert CIFAR10.mirrors[0] + PYTHON_TARBALL == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert (CIFAR10_MEAN, CIFAR10_STD) == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


# ---------------------------------------------------------------------------------------------------------
# Real data: the shared JPEG copy (LLMLAB_DATA); decoded once per module
# ---------------------------------------------------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def _real_memo() -> dict:
    return {}


@pytest.fixture
def real_cifar(shared_data, _real_memo) -> cifar10.Cifar10:
    """The shared copy, decoded on first use (the derived cache is the session's, see conftest)."""
    if "data" not in _real_memo:
        _real_memo["before"] = _snapshot(shared_data)
        _real_memo["data"] = load_cifar10(shared_data, progress=False)
    return _real_memo["data"]


@pytest.mark.slow
def test_real_cifar10_jpeg_copy(real_cifar, shared_data):
    d = real_cifar
    assert d.train_images.shape == (50000, 3, 32, 32) and d.train_images.dtype == torch.uint8
    assert d.test_images.shape == (10000, 3, 32, 32) and d.test_images.dtype == torch.uint8
    assert d.train_labels.dtype == torch.int64 and d.test_labels.shape == (10000,)
    assert torch.bincount(d.train_labels, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(d.test_labels, minlength=10).tolist() == [1000] * 10
    assert d.classes == list(CIFAR10_CLASSES)
    assert d.lossy and d.layout == "image-tarball"
    assert d.source == str(shared_data / "cifar10" / "cifar10_jpg.tar.gz")
    assert "lossy" in d.description()
    # class order, then file name: test/airplane/0000.jpg is the first test image; PIL decodes it the same
    with tarfile.open(shared_data / "cifar10" / "cifar10_jpg.tar.gz", "r|gz") as tf:
        for member in tf:
            if member.name.endswith("test/airplane/0000.jpg"):
                with Image.open(io.BytesIO(tf.extractfile(member).read())) as im:
                    first = torch.from_numpy(np.asarray(im.convert("RGB")).transpose(2, 0, 1).copy())
                break
    assert int(d.test_labels[0]) == 0 and torch.equal(d.test_images[0], first)


@pytest.mark.slow
def test_real_cifar10_second_load_from_cache(real_cifar, shared_data, _real_memo, monkeypatch):
    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(cifar10, "_decode", no_decode)
    again = load_cifar10(shared_data, progress=False)
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(again, name), getattr(real_cifar, name)), name
    assert (again.source, again.lossy, again.classes) == (real_cifar.source, True, real_cifar.classes)
    st = dataset_status("cifar10", shared_data)
    assert st.state == "present" and st.layout == "image-folder tarball, JPEG: lossy"
    assert st.files[0].ok is True and "JPEG: lossy" in format_status([st])
    assert _snapshot(shared_data) == _real_memo["before"]  # the (read-only) data root was never written


@pytest.mark.slow
def test_real_cifar10_mean_std(real_cifar):
    # the figures stated in llmlab/data/cifar10.py for the JPEG copy, and how close they are to the official
    mean, std = dataset_mean_std(real_cifar.train_images)
    np.testing.assert_allclose(mean, (0.4913, 0.4821, 0.4465), atol=6e-5)
    np.testing.assert_allclose(std, (0.2452, 0.2428, 0.2606), atol=6e-5)
    np.testing.assert_allclose(mean, CIFAR10_MEAN, atol=2e-4)
    np.testing.assert_allclose(std, CIFAR10_STD, atol=2.5e-3)
