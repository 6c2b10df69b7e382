"""Grid of synthetic examples per class with their label maps overlaid, for a visual check."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from parsing.atomic import atomic_output
from parsing.labels import EXPRESSIONS, FACE_PARTS_19
from parsing.synthetic.dataset import read_manifest

logger = logging.getLogger(__name__)

# One RGB colour per FACE_PARTS_19 class, close to the CelebAMask-HQ palette.
PART_COLOURS = np.array(
    [
        [0, 0, 0], [204, 0, 0], [76, 153, 0], [204, 204, 0], [51, 51, 255], [204, 0, 204],
        [0, 255, 255], [255, 204, 204], [102, 51, 0], [255, 0, 0], [102, 204, 0], [255, 255, 0],
        [0, 0, 153], [0, 0, 204], [255, 51, 153], [0, 204, 204], [0, 51, 0], [255, 153, 51],
        [0, 204, 0],
    ],
    dtype=np.uint8,
)
OVERLAY_ALPHA = 0.6


def overlay_labels(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Blend part colours over an RGB image (uint8 [H, W, 3]), leaving background pixels unchanged."""
    colours = PART_COLOURS[labels].astype(np.float32)  # [H, W, 3]
    blended = (1 - OVERLAY_ALPHA) * image.astype(np.float32) + OVERLAY_ALPHA * colours
    return np.where((labels > 0)[:, :, None], blended, image.astype(np.float32)).round().astype(np.uint8)


def _read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot read image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _read_labels(path: Path) -> np.ndarray:
    labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if labels is None or labels.ndim != 2:
        raise ValueError(f"cannot read {path} as a single-channel label map")
    return labels


def select_examples(root: Path, manifest: dict, split: str, columns: int) -> dict[str, list[str]]:
    """Pick the first ``columns`` images of each class whose stored label is the drawn class."""
    noisy = {entry["name"] for entry in manifest["noisy_labels"]}
    chosen = {}
    for expression in EXPRESSIONS:
        folder = root / "images" / split / expression
        names = [f"{split}/{expression}/{path.name}" for path in sorted(folder.glob("*.png"))]
        clean = [name for name in names if name not in noisy][:columns]
        if not clean:
            raise ValueError(f"{folder} has no correctly labelled images to show")
        chosen[expression] = clean
    return chosen


def write_figure(root, out_path, columns: int = 4, split: str = "train") -> Path:
    """Write a PNG grid: one row per class, each example as the image beside its overlaid label map."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    root = Path(root)
    out_path = Path(out_path)
    manifest = read_manifest(root)
    if split not in manifest["counts"]:
        raise ValueError(f"split {split!r} not found in {root}. Available splits: {', '.join(manifest['counts'])}")
    chosen = select_examples(root, manifest, split, columns)

    rows = len(EXPRESSIONS)
    height = rows * 1.25 + 0.9  # inches, the last 0.9 for the legend
    figure = Figure(figsize=(2 * columns * 1.2, height))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 2 * columns, squeeze=False)
    for row, expression in enumerate(EXPRESSIONS):
        for column in range(columns):
            image_axis, mask_axis = axes[row, 2 * column], axes[row, 2 * column + 1]
            for axis in (image_axis, mask_axis):
                axis.set_xticks([])
                axis.set_yticks([])
            if column >= len(chosen[expression]):
                image_axis.set_axis_off()
                mask_axis.set_axis_off()
                continue
            name = chosen[expression][column]
            image = _read_rgb(root / "images" / name)
            labels = _read_labels(root / "labels" / name)
            image_axis.imshow(image, interpolation="nearest")
            mask_axis.imshow(overlay_labels(image, labels), interpolation="nearest")
        axes[row, 0].set_ylabel(expression, fontsize=10)
    handles = [
        Patch(facecolor=PART_COLOURS[i] / 255.0, edgecolor="grey", label=f"{i} {name}")
        for i, name in enumerate(FACE_PARTS_19)
    ]
    figure.legend(handles=handles, loc="lower center", ncol=7, fontsize=7, frameon=False)
    figure.suptitle(f"Synthetic faces ({split} split, seed {manifest['seed']}): image | part labels", fontsize=10)
    figure.subplots_adjust(left=0.05, right=0.99, top=0.95, bottom=0.75 / height, wspace=0.04, hspace=0.06)

    with atomic_output(out_path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)
    logger.info("Wrote %s", out_path)
    return out_path
