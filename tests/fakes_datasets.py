"""Builders of tiny dataset folders with the real layouts, file names and label-file formats.

Each builder writes small random images (with a per-class tint so classes differ) and
returns the expected records as ``(name, expression name, split)`` tuples sorted by split
then name, which is the order ``parsing.datasets.read_dataset`` returns.

The RAF-DB and SFEW label tables below are written out independently of ``parsing.datasets``
so that a mistake there cannot hide in both places.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

EXPRESSION_NAMES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

# RAF-DB README: 1 Surprise, 2 Fear, 3 Disgust, 4 Happiness, 5 Sadness, 6 Anger, 7 Neutral.
RAFDB_NATIVE = {"surprise": 1, "fear": 2, "disgust": 3, "happy": 4, "sad": 5, "angry": 6, "neutral": 7}

SFEW_FOLDERS = {
    "angry": "Angry",
    "disgust": "Disgust",
    "fear": "Fear",
    "happy": "Happy",
    "neutral": "Neutral",
    "sad": "Sad",
    "surprise": "Surprise",
}

SFEW_LAYOUTS = {
    "plain": ("Train", "Val"),
    "aligned": ("Train_Aligned_Faces", "Val_Aligned_Faces"),
    "nested": ("Train/Train_Aligned_Faces", "Val/Val_Aligned_Faces"),
    "lower": ("train", "val"),
}

Expected = list[tuple[str, str, str]]


def tinted_image(rng: np.random.Generator, size: int | tuple[int, int], class_index: int) -> np.ndarray:
    """Return a uint8 RGB image [H, W, 3] of noise tinted by the class index."""
    height, width = (size, size) if isinstance(size, int) else size
    image = rng.integers(0, 96, size=(height, width, 3))
    image[..., class_index % 3] += 20 * class_index + 30
    return np.clip(image, 0, 255).astype(np.uint8)


def write_image(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB array with Pillow, in the format given by the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def _sorted(expected: Expected) -> Expected:
    return sorted(expected, key=lambda item: (item[2], item[0]))


def make_rafdb_tree(
    root: Path,
    n_train_per_class: int = 1,
    n_test_per_class: int = 1,
    size: int = 16,
    seed: int = 0,
    line_ending: str = "\n",
) -> Expected:
    """Write ``EmoLabel/list_patition_label.txt`` and ``Image/aligned/*_aligned.jpg``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    lines = []
    expected = []
    for split, per_class in (("train", n_train_per_class), ("test", n_test_per_class)):
        number = 0
        for class_index, expression in enumerate(EXPRESSION_NAMES):
            for _ in range(per_class):
                number += 1
                listed = f"{split}_{number:05d}.jpg"
                image_name = f"{split}_{number:05d}_aligned.jpg"
                write_image(root / "Image" / "aligned" / image_name, tinted_image(rng, size, class_index))
                lines.append(f"{listed} {RAFDB_NATIVE[expression]}")
                expected.append((f"Image/aligned/{image_name}", expression, split))
    label_file = root / "EmoLabel" / "list_patition_label.txt"
    label_file.parent.mkdir(parents=True, exist_ok=True)
    label_file.write_bytes(line_ending.join(lines).encode() + line_ending.encode())
    return _sorted(expected)


def make_sfew_tree(
    root: Path,
    n_train_per_class: int = 1,
    n_val_per_class: int = 1,
    size: int | tuple[int, int] = (18, 14),
    seed: int = 0,
    layout: str = "plain",
) -> Expected:
    """Write SFEW-style ``<Train>/<Emotion>/*.png`` and ``<Val>/<Emotion>/*.png`` folders.

    ``layout`` is one of ``SFEW_LAYOUTS``; the default size keeps SFEW's portrait aspect
    (the official aligned faces are 143 wide and 181 high).
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    train_folder, val_folder = SFEW_LAYOUTS[layout]
    expected = []
    frame = 0
    for folder, split, per_class in ((train_folder, "train", n_train_per_class), (val_folder, "test", n_val_per_class)):
        for expression, emotion_folder in SFEW_FOLDERS.items():
            if layout == "lower":
                emotion_folder = emotion_folder.lower()
            class_index = EXPRESSION_NAMES.index(expression)
            for _ in range(per_class):
                frame += 1
                name = f"{folder}/{emotion_folder}/Movie_{frame:09d}_{frame:08d}.png"
                write_image(root / name, tinted_image(rng, size, class_index))
                expected.append((name, expression, split))
    return _sorted(expected)


def make_folder_tree(
    root: Path,
    per_split: dict[str, int] | None = None,
    size: int = 16,
    seed: int = 0,
    class_folders: dict[str, str] | None = None,
    extension: str = ".png",
) -> Expected:
    """Write ``<root>/<split>/<class folder>/<index><extension>``.

    ``per_split`` maps split folder -> images per class (default train 2, test 1).
    ``class_folders`` maps expression name -> folder name (default: the expression name).
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    per_split = {"train": 2, "test": 1} if per_split is None else per_split
    class_folders = {name: name for name in EXPRESSION_NAMES} if class_folders is None else class_folders
    expected = []
    for split_folder, per_class in per_split.items():
        for expression, folder in class_folders.items():
            class_index = EXPRESSION_NAMES.index(expression)
            for index in range(per_class):
                name = f"{split_folder}/{folder}/{index:05d}{extension}"
                write_image(root / name, tinted_image(rng, size, class_index))
                expected.append((name, expression, split_folder.lower()))
    return _sorted(expected)


def make_csv_dataset(
    root: Path,
    per_split: dict[str, int] | None = None,
    size: int = 16,
    seed: int = 0,
    manifest_name: str = "manifest.csv",
    integer_labels: bool = False,
) -> Expected:
    """Write images under ``root/images/`` and a manifest ``path,label,split,source``.

    Labels are class names, or indices in the canonical order with ``integer_labels``. The
    extra ``source`` column checks that readers ignore unknown columns.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    per_split = {"train": 2, "test": 1} if per_split is None else per_split
    expected = []
    rows = []
    for split, per_class in per_split.items():
        for class_index, expression in enumerate(EXPRESSION_NAMES):
            for index in range(per_class):
                name = f"images/{split}_{expression}_{index:03d}.png"
                write_image(root / name, tinted_image(rng, size, class_index))
                label = str(class_index) if integer_labels else expression
                rows.append({"path": name, "label": label, "split": split, "source": "fake"})
                expected.append((name, expression, split.lower()))
    manifest = root / manifest_name
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "split", "source"])
        writer.writeheader()
        writer.writerows(rows)
    return _sorted(expected)
