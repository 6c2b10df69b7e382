"""Figure 5: example faces with their 8-class parsing masks overlaid."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import h5py
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from parsing.archive import ArchiveMismatchError, read_attrs, read_cache_info, validate_archive
from parsing.atomic import atomic_output
from parsing.labels import EXPRESSIONS, FACE_PARTS_8

logger = logging.getLogger(__name__)

# One fixed RGB colour per coarse class (matplotlib's tab10 colours), so that figures of
# different datasets read the same. Background (class 0) is left untinted.
COARSE_COLOURS: dict[str, tuple[int, int, int] | None] = {
    "background": None,
    "skin": (255, 127, 14),
    "eye": (31, 119, 180),
    "ear": (148, 103, 189),
    "nose": (44, 160, 44),
    "mouth": (214, 39, 40),
    "neck": (140, 86, 75),
    "hair": (23, 190, 207),
}


def overlay_mask(image: np.ndarray, mask8: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the class colours of ``mask8`` uint8 [H, W] into RGB ``image`` uint8 [H, W, 3].

    Pixels of class 0 (background) keep their original colour.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    palette = np.array([COARSE_COLOURS[name] or (0, 0, 0) for name in FACE_PARTS_8], dtype=np.float32)  # [8, 3]
    tinted = (1.0 - alpha) * image.astype(np.float32) + alpha * palette[mask8]
    blended = np.where((mask8 > 0)[..., None], tinted, image.astype(np.float32))
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def select_examples(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Pick ``count`` image indices at random, taking the expressions in turn so each one appears.

    Returns the indices grouped by expression, in expression order.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(labels == label))) for label in range(len(EXPRESSIONS))]
    chosen: list[tuple[int, int]] = []
    while len(chosen) < count and any(pools):
        for label, pool in enumerate(pools):
            if pool and len(chosen) < count:
                chosen.append((label, int(pool.pop())))
    if len(chosen) < count:
        logger.warning("only %d images available, showing all of them", len(chosen))
    return np.array([index for _, index in sorted(chosen)], dtype=np.int64)


def plot_mask_grid(
    archive_path: str | os.PathLike,
    cache_path: str | os.PathLike,
    out_path: str | os.PathLike,
    count: int = 8,
    seed: int = 0,
    alpha: float = 0.5,
    columns: int = 4,
    split: str | None = None,
) -> Path:
    """Draw ``count`` cache images, each above its 8-class mask overlay, with a legend; save to ``out_path``.

    The archive must match the cache (the same checks as ``slfer-parse validate``). ``split``
    restricts the examples to one split. The image format follows the suffix of ``out_path``.
    """
    out_path = Path(out_path)
    image_format = out_path.suffix.lstrip(".").lower()
    if not image_format:
        raise ValueError(f"output {out_path} has no suffix; use .png, .pdf or .svg")
    problems = validate_archive(archive_path, cache_path)
    if problems:
        raise ArchiveMismatchError(archive_path, problems)

    cache = read_cache_info(cache_path)
    candidates = np.arange(cache.num_images)
    if split is not None:
        candidates = candidates[np.asarray(cache.split, dtype=object) == split]
        if len(candidates) == 0:
            raise ValueError(f"split {split!r} has no images in {cache.path}")
    chosen = candidates[select_examples(cache.labels[candidates], count, seed)]  # grouped by expression
    # h5py reads rows in increasing order only: read sorted, then put each row back in place.
    order = np.argsort(chosen)
    with h5py.File(cache.path, "r") as file:
        images = np.empty((len(chosen),) + file["images"].shape[1:], dtype=np.uint8)  # [K, S, S, 3]
        images[order] = file["images"][chosen[order]]
    with h5py.File(archive_path, "r") as file:
        masks8 = np.empty((len(chosen),) + file["masks8"].shape[1:], dtype=np.uint8)  # [K, S, S]
        masks8[order] = file["masks8"][chosen[order]]
        attrs = read_attrs(file)
    coarse_names = json.loads(attrs["coarse_names"])

    columns = min(columns, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    figure = Figure(figsize=(2.2 * columns, 4.4 * rows + 0.8), layout="constrained")
    axes = figure.subplots(2 * rows, columns, squeeze=False)
    for axis in axes.flat:
        axis.set_axis_off()
    for position, (image, mask8, index) in enumerate(zip(images, masks8, chosen)):
        row, column = divmod(position, columns)
        axes[2 * row, column].imshow(image)
        axes[2 * row, column].set_title(EXPRESSIONS[int(cache.labels[index])], fontsize=9)
        axes[2 * row + 1, column].imshow(overlay_mask(image, mask8, alpha))

    handles = []
    for name in coarse_names:
        colour = COARSE_COLOURS[name]
        face = np.array(colour) / 255 if colour else "none"
        label = name if colour else f"{name} (untinted)"
        handles.append(Patch(facecolor=face, edgecolor="black", label=label))
    figure.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    backend = attrs["parser_backend"]
    figure.suptitle(f"{attrs['dataset']}: 8-class face-part masks ({backend} parser)", fontsize=10)

    with atomic_output(out_path) as temp_path:
        figure.savefig(temp_path, format=image_format, dpi=150)
    logger.info("wrote mask figure %s (%d images)", out_path, len(chosen))
    return out_path

