"""Datasets: where they live (data root, cache), their specs and status, download, and one loader per dataset.

Importing this package registers every dataset spec in `DATASETS` (mnist, digits, ...).
"""

from llmlab.data.digits import DIGITS, load_digits_splits
from llmlab.data.mnist import MNIST, MNIST_MEAN, MNIST_STD, load_mnist, read_idx, write_idx
from llmlab.data.store import (
    DATASETS,
    DataCorruptError,
    DataDownloadError,
    DataMissingError,
    DatasetSpec,
    DatasetStatus,
    FileSpec,
    FileStatus,
    cache_dir,
    data_root,
    data_root_source,
    dataset_status,
    download_dataset,
    find_file,
    format_status,
    get_spec,
    locate_dataset,
    register_dataset,
    verify_file,
)
from llmlab.data.synthetic import synthetic_classification

__all__ = [
    "DATASETS",
    "DIGITS",
    "MNIST",
    "MNIST_MEAN",
    "MNIST_STD",
    "DataCorruptError",
    "DataDownloadError",
    "DataMissingError",
    "DatasetSpec",
    "DatasetStatus",
    "FileSpec",
    "FileStatus",
    "cache_dir",
    "data_root",
    "data_root_source",
    "dataset_status",
    "download_dataset",
    "find_file",
    "format_status",
    "get_spec",
    "load_digits_splits",
    "load_mnist",
    "locate_dataset",
    "read_idx",
    "register_dataset",
    "synthetic_classification",
    "verify_file",
    "write_idx",
]
