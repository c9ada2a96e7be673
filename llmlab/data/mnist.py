"""MNIST read directly from the published IDX files.

Reference: Y. LeCun, C. Cortes, C. J. C. Burges, "The MNIST database of handwritten digits",
http://yann.lecun.com/exdb/mnist/ ("FILE FORMATS FOR THE MNIST DATABASE"): an IDX file is a 4-byte magic
number (two zero bytes, a type code, the number of dimensions), one big-endian uint32 per dimension, then the
data in row-major (C) order, big-endian. The mirrors are the ones torchvision's `datasets.MNIST` uses.

The sha256 values are of the DECOMPRESSED files; the four match the official files' content.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llmlab.data.store import DatasetSpec, FileSpec, is_gzip, locate_dataset, register_dataset

if TYPE_CHECKING:
    import torch

MNIST_MEAN = 0.1307  # mean pixel of the training images scaled to [0, 1]
MNIST_STD = 0.3081

MNIST = register_dataset(
    DatasetSpec(
        name="mnist",
        description="MNIST handwritten digits, 60000 train + 10000 test 28x28 grayscale (IDX files)",
        # `mnist/` is llmlab's layout; `MNIST/raw/` is where torchvision keeps its download.
        subdirs=("mnist", "MNIST/raw"),
        files=(
            FileSpec(
                "train-images-idx3-ubyte",
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                47040016,
            ),
            FileSpec(
                "train-labels-idx1-ubyte",
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                60008,
            ),
            FileSpec(
                "t10k-images-idx3-ubyte",
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                7840016,
            ),
            FileSpec(
                "t10k-labels-idx1-ubyte",
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
                10008,
            ),
        ),
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        homepage="http://yann.lecun.com/exdb/mnist/",
        citation="Y. LeCun, L. Bottou, Y. Bengio, P. Haffner, Gradient-based learning applied to document "
        "recognition, Proc. IEEE 86(11), 1998",
        license="CC BY-SA 3.0 (Y. LeCun and C. Cortes)",
    )
)

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, str] = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_exact(f, n: int, what: str, path: Path) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"{path}: truncated IDX file: {what} needs {n} bytes, found {len(data)}")
    return data


def _read_into(f, buf: memoryview) -> int:
    # readinto may return short counts (e.g. on pipes); loop until the buffer is full or the file ends.
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])
        if not n:
            break
        got += n
    return got


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped or plain, detected by magic bytes) into a native-endian numpy array.

    Raises ValueError for a bad magic number, a truncated header, a payload whose length does not match the
    dimensions, or a damaged gzip stream.
    """
    path = Path(path)
    gz = is_gzip(path)
    f = gzip.open(path, "rb") if gz else open(path, "rb")
    try:
        with f:
            magic = _read_exact(f, 4, "the magic number", path)
            if magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
                types = sorted(hex(t) for t in _IDX_DTYPES)
                raise ValueError(
                    f"{path}: not an IDX file (magic bytes {magic.hex()}; expected 00 00 <type> "
                    f"<ndim> with type in {types})"
                )
            dtype = np.dtype(_IDX_DTYPES[magic[2]])
            ndim = magic[3]
            dims = struct.unpack(f">{ndim}I", _read_exact(f, 4 * ndim, f"the {ndim} dimensions", path))
            expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
            # Read straight into the final buffer: one copy of the payload, and the array stays writable.
            out = np.empty(expected, dtype=np.uint8)
            got = _read_into(f, memoryview(out))
            extra = len(f.read(1))
            if got != expected or extra:
                found = f"{got}" if not extra else f"more than {expected}"
                raise ValueError(
                    f"{path}: IDX payload length does not match its dimensions {dims} "
                    f"({dtype.itemsize} byte items): expected {expected} bytes, found {found}"
                )
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a cut stream is EOFError
        raise ValueError(f"{path}: damaged gzip stream: {e}") from e
    arr = out.view(dtype).reshape(dims)
    return arr if dtype.itemsize == 1 else arr.astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write `array` as an IDX file; gzipped when `path` ends with `.gz`. The inverse of `read_idx`."""
    path = Path(path)
    arr = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    native = arr.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"IDX cannot store dtype {arr.dtype}; supported: {sorted(str(d) for d in codes)}")
    header = bytes([0, 0, codes[native], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = np.ascontiguousarray(arr, dtype=np.dtype(_IDX_DTYPES[codes[native]])).tobytes()
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header)
        f.write(payload)
    return path


def load_mnist(
    root: str | Path | None = None, verify: bool = True
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """MNIST as {"train": (images, labels), "test": (images, labels)}.

    Images are uint8 [N, 28, 28] (0..255, not normalised: use MNIST_MEAN/MNIST_STD), labels int64 [N]; N is
    60000 for train and 10000 for test. Files are looked up under the data root (`root` > LLMLAB_DATA >
    ~/.cache/llmlab) in `mnist/` then `MNIST/raw/`; missing files raise DataMissingError before anything is
    read; with `verify`, checksums are checked (cached in cache_dir(), so only the first load hashes).
    """
    import torch

    paths = locate_dataset(MNIST, root, verify=verify)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for split, prefix, n in (("train", "train", 60000), ("test", "t10k", 10000)):
        images = read_idx(paths[f"{prefix}-images-idx3-ubyte"])
        labels = read_idx(paths[f"{prefix}-labels-idx1-ubyte"])
        if images.shape != (n, 28, 28) or labels.shape != (n,):
            raise ValueError(
                f"MNIST {split}: expected images (n, 28, 28) and labels (n,) with n={n}, "
                f"got {images.shape} and {labels.shape}"
            )
        out[split] = (torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))
    return out
