"""Write image caches in the slfer-image-cache format (version 1) for tests.

Tests of the parser and the archive need caches with chosen pixels and names. Building
them with h5py directly keeps those tests independent of the dataset readers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from parsing.cache import image_list_hash
from parsing.labels import EXPRESSIONS


def write_cache_file(
    path: Path,
    images: np.ndarray,
    names: Sequence[str],
    labels: np.ndarray,
    splits: Sequence[str],
    dataset: str = "toy",
) -> Path:
    """Write ``images`` (uint8 [N, S, S, 3]) with their index as a version 1 image cache."""
    string = h5py.string_dtype("utf-8")
    size = images.shape[1]
    labels = np.asarray(labels, dtype=np.int16)
    with h5py.File(path, "w") as file:
        file.create_dataset("images", data=images, chunks=(1, size, size, 3))
        file.create_dataset("names", data=np.array(names, dtype=object), dtype=string)
        file.create_dataset("labels", data=labels)
        file.create_dataset("split", data=np.array(splits, dtype=object), dtype=string)
        file.attrs.update(
            {
                "format": "slfer-image-cache",
                "format_version": 1,
                "dataset": dataset,
                "image_list_hash": image_list_hash(list(names), labels, list(splits)),
                "image_size": size,
                "expressions": json.dumps(list(EXPRESSIONS)),
                "skipped": "[]",
                "source_format": "folder",
                "package_version": "test",
                "created": "2026-01-01T00:00:00+00:00",
            }
        )
    return path


def write_random_cache(
    path: Path,
    count: int,
    size: int,
    dataset: str = "toy",
    seed: int = 0,
    test_every: int = 3,
    extension: str = "png",
) -> Path:
    """Write a cache of ``count`` random images; every ``test_every``-th image is in the test split."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count, dtype=np.int16) % len(EXPRESSIONS)
    splits = ["train" if i % test_every else "test" for i in range(count)]
    names = [
        f"{split}/{EXPRESSIONS[label]}/{i:05d}.{extension}" for i, (label, split) in enumerate(zip(labels, splits))
    ]
    images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    return write_cache_file(path, images, names, labels, splits, dataset)
