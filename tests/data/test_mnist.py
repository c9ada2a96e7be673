"""IDX reading (round trips, damaged files) and MNIST loading (missing, corrupt, the real shared files)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from llmlab.data import store
from llmlab.data.mnist import MNIST, MNIST_MEAN, MNIST_STD, load_mnist, read_idx, write_idx
from llmlab.data.store import DataCorruptError, DataMissingError, dataset_status, locate_dataset

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ---------------------------------------------------------------------------------------------------------
# IDX format
# ---------------------------------------------------------------------------------------------------------


def test_read_idx_matches_the_published_layout(tmp_path):
    # built by hand from LeCun's description: 00 00 <type 0x08> <ndim 2>, dims big-endian, data row-major
    raw = bytes([0, 0, 0x08, 2]) + struct.pack(">II", 2, 3) + bytes([1, 2, 3, 4, 5, 250])
    (tmp_path / "x.idx").write_bytes(raw)
    arr = read_idx(tmp_path / "x.idx")
    assert arr.dtype == np.uint8 and arr.shape == (2, 3)
    assert arr.tolist() == [[1, 2, 3], [4, 5, 250]]
    assert arr.flags.writeable  # torch.from_numpy must not warn
    # big-endian int32 payload
    raw = bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 2) + struct.pack(">ii", -7, 70000)
    (tmp_path / "y.idx").write_bytes(raw)
    y = read_idx(tmp_path / "y.idx")
    assert y.dtype == np.int32 and y.tolist() == [-7, 70000]


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 5 * 4, dtype=np.uint8).reshape(2, 5, 4),
        np.array([3, 1, 4, 1, 5, 9], dtype=np.uint8),
        np.arange(-6, 6, dtype=np.int16).reshape(3, 4),
        np.linspace(-1, 1, 10, dtype=np.float32).reshape(5, 2),
        np.array([[1e300, -2.5]], dtype=np.float64),
        np.zeros((0, 28, 28), dtype=np.uint8),
    ],
    ids=["u8-3d", "u8-1d", "i16", "f32", "f64", "empty"],
)
def test_idx_round_trip(tmp_path, array, suffix):
    path = write_idx(tmp_path / ("a.idx" + suffix), array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    out = read_idx(path)
    assert out.dtype == array.dtype.newbyteorder("=") and out.shape == array.shape
    np.testing.assert_array_equal(out, array)


def test_gzip_is_detected_by_magic_not_name(tmp_path):
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    gz = write_idx(tmp_path / "a.idx.gz", a)
    disguised = tmp_path / "a.idx"
    disguised.write_bytes(gz.read_bytes())
    np.testing.assert_array_equal(read_idx(disguised), a)


def _idx_bytes(a: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_or_extra_payload_is_a_clear_error(tmp_path, gz):
    good = _idx_bytes(np.arange(60, dtype=np.uint8).reshape(3, 4, 5))
    for name, data in [("short", good[:-7]), ("long", good + b"\x00\x01")]:
        path = tmp_path / name
        path.write_bytes(gzip.compress(data) if gz else data)
        with pytest.raises(ValueError, match=r"payload length does not match its dimensions \(3, 4, 5\)"):
            read_idx(path)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "truncated IDX file"),
        (b"\x00\x00", "truncated IDX file"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated IDX file"),  # 3 dims announced, 1 given
        (b"PK\x03\x04rest", "not an IDX file"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "not an IDX file"),  # unknown type code
    ],
    ids=["empty", "short-magic", "short-dims", "zip", "bad-type"],
)
def test_garbled_header_is_a_clear_error(tmp_path, data, match):
    path = tmp_path / "bad.idx"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match):
        read_idx(path)


def test_damaged_gzip_is_a_value_error(tmp_path):
    gz = gzip.compress(_idx_bytes(np.arange(4000, dtype=np.uint8) % 7))
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gz[: len(gz) // 2])
    with pytest.raises(ValueError, match="damaged gzip stream"):
        read_idx(cut)
    garbled = tmp_path / "garbled.gz"
    garbled.write_bytes(gz[:10] + bytes(b ^ 0x5A for b in gz[10:]))
    with pytest.raises(ValueError, match="damaged gzip stream"):
        read_idx(garbled)


def test_write_idx_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="IDX cannot store"):
        write_idx(tmp_path / "x.idx", np.zeros(3, dtype=np.int64))


# ---------------------------------------------------------------------------------------------------------
# MNIST without the real files
# ---------------------------------------------------------------------------------------------------------


def test_mnist_spec():
    assert [f.name for f in MNIST.files] == [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    assert MNIST.subdirs == ("mnist", "MNIST/raw")
    assert MNIST.mirrors[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"
    assert [f.size for f in MNIST.files] == [16 + 60000 * 784, 8 + 60000, 16 + 10000 * 784, 8 + 10000]
    assert (MNIST_MEAN, MNIST_STD) == (0.1307, 0.3081)


def test_missing_mnist_raises_before_reading(tmp_path):
    # three files present but garbage: the missing fourth must be reported, not a parse error
    for f in MNIST.files[:3]:
        (tmp_path / "mnist").mkdir(exist_ok=True)
        (tmp_path / "mnist" / f.name).write_bytes(b"garbage")
    with pytest.raises(DataMissingError) as info:
        load_mnist(tmp_path)
    msg = str(info.value)
    assert "t10k-labels-idx1-ubyte" in msg and "llmlab data status" in msg
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz" in msg

    with pytest.raises(DataMissingError) as info:
        load_mnist(tmp_path / "empty")
    for f in MNIST.files:
        assert f.name in str(info.value)


def test_missing_mnist_uses_env_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAB_DATA", str(tmp_path))
    with pytest.raises(DataMissingError, match="env LLMLAB_DATA"):
        load_mnist()


def test_corrupt_mnist_raises(tmp_path):
    folder = _mkdir(tmp_path / "mnist")
    for f in MNIST.files:
        write_idx(folder / (f.name + ".gz"), np.zeros((2, 28, 28), dtype=np.uint8))  # valid IDX, wrong data
    with pytest.raises(DataCorruptError) as info:
        load_mnist(tmp_path)
    assert "train-images-idx3-ubyte" in str(info.value)
    # without verification the wrong shapes are still caught
    with pytest.raises(ValueError, match="expected images"):
        load_mnist(tmp_path, verify=False)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def test_torchvision_layout_is_found(tmp_path):
    raw = _mkdir(tmp_path / "MNIST" / "raw")
    for f in MNIST.files:
        (raw / f.name).write_bytes(b"")  # torchvision keeps the decompressed files here
    paths = locate_dataset("mnist", tmp_path, verify=False)
    assert paths["t10k-images-idx3-ubyte"] == raw / "t10k-images-idx3-ubyte"


# ---------------------------------------------------------------------------------------------------------
# Real data (LLMLAB_DATA)
# ---------------------------------------------------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.slow
def test_load_real_mnist(shared_data):
    before = _snapshot(shared_data / "mnist")
    data = load_mnist(shared_data)
    assert set(data) == {"train", "test"}
    for split, n, counts in (("train", 60000, TRAIN_COUNTS), ("test", 10000, TEST_COUNTS)):
        images, labels = data[split]
        assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.int64
        assert torch.bincount(labels, minlength=10).tolist() == counts
        assert int(images.max()) == 255 and int(images.min()) == 0
    # the published normalisation constants come from the training images
    hist = np.bincount(data["train"][0].numpy().ravel(), minlength=256).astype(np.float64)
    values = np.arange(256) / 255.0
    mean = (hist * values).sum() / hist.sum()
    std = np.sqrt((hist * (values - mean) ** 2).sum() / hist.sum())
    assert abs(mean - MNIST_MEAN) < 5e-5 and abs(std - MNIST_STD) < 5e-5
    assert _snapshot(shared_data / "mnist") == before  # read-only root: nothing written


def test_real_mnist_status_and_cache(shared_data, monkeypatch):
    before = _snapshot(shared_data)
    st = dataset_status("mnist", shared_data)
    assert st.state == "present"
    assert all(f.ok is True for f in st.files)
    assert all(f.path is not None and f.path.parent == shared_data / "mnist" for f in st.files)
    # the verification results are cached outside the data root: a second check hashes nothing
    calls = []
    monkeypatch.setattr(store, "content_sha256", lambda p: calls.append(p) or ("x", 0))
    assert dataset_status("mnist", shared_data).state == "present"
    assert calls == []
    assert _snapshot(shared_data) == before
