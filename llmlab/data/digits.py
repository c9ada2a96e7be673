"""scikit-learn's bundled 8x8 handwritten digits: an offline stand-in for MNIST.

Reference: the UCI "Optical Recognition of Handwritten Digits" test set (Alpaydin & Kaynak, 1998), as shipped
with scikit-learn (`sklearn.datasets.load_digits`): 1797 images of 8x8 pixels, each pixel a count 0..16.
It needs no download, so CPU presets and tests can train a real (if small) image classifier anywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmlab.data.store import DatasetSpec, register_dataset

if TYPE_CHECKING:
    import torch

DIGITS = register_dataset(
    DatasetSpec(
        name="digits",
        description="scikit-learn's bundled 8x8 digits (1797 images), offline stand-in for MNIST",
        homepage="https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
        citation="E. Alpaydin, C. Kaynak, Optical Recognition of Handwritten Digits, UCI ML Repository, 1998",
        license="CC BY 4.0 (UCI); shipped with scikit-learn (BSD-3-Clause)",
        bundled=True,
    )
)


def load_digits_splits(
    test_fraction: float = 0.2, seed: int = 0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The digits as {"train": (images, labels), "test": (images, labels)}.

    A fixed split, stratified by class and seeded (`seed`), with `test_fraction` of the images in "test"
    (default: 1437 train / 360 test). Images are float32 [N, 8, 8] in [0, 1] (pixel counts divided by 16),
    labels int64 [N] in 0..9. Deterministic: the same arguments give identical tensors.
    """
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype("float32") / 16.0  # [1797, 8, 8], counts 0..16 -> [0, 1]
    labels = bunch.target.astype("int64")  # [1797]
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    return {
        "train": (torch.from_numpy(x_train), torch.from_numpy(y_train)),
        "test": (torch.from_numpy(x_test), torch.from_numpy(y_test)),
    }
