"""Write a synthetic face dataset: images, 19-class label maps and a manifest.

Layout under the output root::

    images/<split>/<class>/<stem>.png   RGB face images (the generic folder reader reads images/)
    labels/<split>/<class>/<stem>.png   uint8 single-channel maps with FACE_PARTS_19 ids
    manifest.json                       parameters, counts and the list of noisy labels

Every image draws its randomness from ``SeedSequence(seed, spawn_key=(1, split number, image index))``
alone, so the output is byte-identical for a given seed whatever the number
of worker processes. Files are written under a temporary name and renamed, and
the manifest is written last: a folder with a manifest is complete.

NOTE: byte-identity holds for one installation. Other numpy (random streams) or
OpenCV (rasteriser, JPEG and PNG codecs) versions may change pixels, so the
manifest records both versions.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

import parsing
from parsing.atomic import atomic_output
from parsing.labels import EXPRESSIONS, FACE_PARTS_19
from parsing.synthetic.faces import GeneratorConfig, sample_face_params
from parsing.synthetic.render import render_face

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "slfer-synthetic-faces"
# Bump when the same seed and parameters would produce different pixels.
GENERATOR_VERSION = 1
SPLITS = ("train", "test")
MANIFEST_NAME = "manifest.json"

# First entry of every spawn_key: keeps the label-noise plan and the images on
# separate random streams.
_PLAN_STREAM = 0
_IMAGE_STREAM = 1
_SPLIT_KEYS = {split: index for index, split in enumerate(SPLITS)}


@dataclass(frozen=True)
class ImageTask:
    """One image to draw: ``label`` is the stored class, ``true_label`` the drawn one."""

    split: str
    index: int
    label: int
    true_label: int

    @property
    def name(self) -> str:
        """Path relative to ROOT/images, as the generic folder reader names images."""
        return f"{self.split}/{EXPRESSIONS[self.label]}/{self.index:05d}.png"


def plan_split(seed: int, split: str, per_class: int, label_noise: float) -> list[ImageTask]:
    """List the images of one split: ``per_class`` stored labels per class, some of them noisy.

    Exactly ``round(label_noise * count)`` images, chosen at random, show a
    different class than the one they are stored under. The drawn class of a
    noisy image is uniform over the other six classes.
    """
    count = per_class * len(EXPRESSIONS)
    stored = np.arange(count) % len(EXPRESSIONS)  # interleaved, so any prefix covers every class
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_PLAN_STREAM, _SPLIT_KEYS[split])))
    num_noisy = int(round(label_noise * count))
    noisy = rng.choice(count, size=num_noisy, replace=False)
    true = stored.copy()
    true[noisy] = (stored[noisy] + rng.integers(1, len(EXPRESSIONS), size=num_noisy)) % len(EXPRESSIONS)
    return [ImageTask(split, i, int(stored[i]), int(true[i])) for i in range(count)]


def render_task(task: ImageTask, seed: int, size: int, config: GeneratorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Draw the image (uint8 [S, S, 3] RGB) and label map (uint8 [S, S]) of one task."""
    sequence = np.random.SeedSequence(seed, spawn_key=(_IMAGE_STREAM, _SPLIT_KEYS[task.split], task.index))
    rng = np.random.default_rng(sequence)
    params = sample_face_params(rng, task.true_label, size, config)
    return render_face(params, size, rng)


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_output(path) as temporary:
        temporary.write_bytes(data)


def _encode_png(array: np.ndarray, path: Path) -> bytes:
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise RuntimeError(f"OpenCV failed to PNG-encode {path}")
    return encoded.tobytes()


def _generate_one(job: tuple) -> ImageTask:
    """Draw one task and write its image and label map (runs in worker processes)."""
    task, root, seed, size, config = job
    image, labels = render_task(task, seed, size, config)
    image_path = root / "images" / task.name
    label_path = root / "labels" / task.name
    _write_bytes_atomic(image_path, _encode_png(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), image_path))
    _write_bytes_atomic(label_path, _encode_png(labels, label_path))
    return task


def _validate_arguments(seed, size, train_per_class, test_per_class, label_noise, workers) -> None:
    checks = [
        (isinstance(seed, (int, np.integer)) and seed >= 0, f"seed must be a non-negative integer, got {seed!r}"),
        (isinstance(size, (int, np.integer)) and size >= 16, f"image size must be an integer of at least 16 pixels, got {size!r}"),
        (train_per_class >= 1, f"train_per_class must be at least 1, got {train_per_class}"),
        (test_per_class >= 1, f"test_per_class must be at least 1, got {test_per_class}"),
        (0.0 <= label_noise < 1.0, f"label_noise must be a fraction in [0, 1), got {label_noise}"),
        (workers >= 0, f"workers must be 0 (draw in this process) or a positive count, got {workers}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _prepare_root(root: Path, overwrite: bool) -> None:
    """Create the class folders, removing an earlier dataset only when ``overwrite`` is set."""
    existing = [root / MANIFEST_NAME, root / "images", root / "labels"]
    found = [path for path in existing if path.exists()]
    if found and not overwrite:
        raise FileExistsError(
            f"{root} already contains {', '.join(p.name for p in found)} from an earlier (possibly partial) "
            "synthetic dataset; choose an empty folder or pass overwrite=True (--overwrite on the command line)"
        )
    if found:
        logger.info("Removing the earlier dataset in %s", root)
        # The manifest goes first, so an interrupted removal never leaves a folder that looks complete.
        (root / MANIFEST_NAME).unlink(missing_ok=True)
        for folder in ("images", "labels"):
            if (root / folder).exists():
                shutil.rmtree(root / folder)
    for kind in ("images", "labels"):
        for split in SPLITS:
            for expression in EXPRESSIONS:
                (root / kind / split / expression).mkdir(parents=True, exist_ok=True)


def generate_dataset(
    out_root,
    seed: int,
    size: int = 256,
    train_per_class: int = 200,
    test_per_class: int = 50,
    label_noise: float = 0.1,
    workers: int = 0,
    overwrite: bool = False,
    config: GeneratorConfig | None = None,
) -> dict:
    """Generate a synthetic face dataset under ``out_root`` and return its manifest.

    ``workers`` = 0 draws in this process; K > 0 uses K worker processes. The
    output does not depend on ``workers``. Raises FileExistsError when the
    folder already contains a dataset and ``overwrite`` is false.
    """
    _validate_arguments(seed, size, train_per_class, test_per_class, label_noise, workers)
    config = config or GeneratorConfig()
    root = Path(out_root)
    _prepare_root(root, overwrite)
    per_class = {"train": train_per_class, "test": test_per_class}
    tasks = [task for split in SPLITS for task in plan_split(seed, split, per_class[split], label_noise)]
    jobs = [(task, root, int(seed), int(size), config) for task in tasks]
    logger.info("Drawing %d synthetic faces of %dx%d pixels into %s", len(jobs), size, size, root)

    progress = tqdm(total=len(jobs), desc="synth", unit="image")
    if workers == 0:
        for job in jobs:
            _generate_one(job)
            progress.update()
    else:
        # spawn, not fork: the parent may hold torch or OpenMP threads, which fork can deadlock.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_generate_one, jobs, chunksize=16):
                progress.update()
    progress.close()

    manifest = build_manifest(tasks, seed, size, per_class, label_noise, config)
    _write_bytes_atomic(root / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    logger.info("Wrote %s (%d noisy labels)", root / MANIFEST_NAME, len(manifest["noisy_labels"]))
    return manifest


def build_manifest(tasks: list[ImageTask], seed: int, size: int, per_class: dict, label_noise: float,
                   config: GeneratorConfig) -> dict:
    """Describe a generated dataset. ``workers`` is left out on purpose because it never changes the output."""
    counts = {split: {name: 0 for name in EXPRESSIONS} for split in SPLITS}
    true_counts = {split: {name: 0 for name in EXPRESSIONS} for split in SPLITS}
    noisy = []
    for task in tasks:
        counts[task.split][EXPRESSIONS[task.label]] += 1
        true_counts[task.split][EXPRESSIONS[task.true_label]] += 1
        if task.label != task.true_label:
            noisy.append({
                "name": task.name, "split": task.split,
                "label": EXPRESSIONS[task.label], "true_label": EXPRESSIONS[task.true_label],
            })
    return {
        "format": MANIFEST_FORMAT,
        "generator_version": GENERATOR_VERSION,
        "package_version": parsing.__version__,
        "numpy_version": np.__version__,
        "opencv_version": cv2.__version__,
        "seed": int(seed),
        "size": int(size),
        "train_per_class": int(per_class["train"]),
        "test_per_class": int(per_class["test"]),
        "label_noise": float(label_noise),
        "config": config.to_json(),
        "expressions": list(EXPRESSIONS),
        "face_parts": list(FACE_PARTS_19),
        "layout": {
            "images": "images/<split>/<class>/<stem>.png",
            "labels": "labels/<split>/<class>/<stem>.png",
            "class": "stored label; noisy_labels lists the images that show another class",
        },
        "counts": counts,
        "true_counts": true_counts,
        "noisy_labels": noisy,
    }


def read_manifest(root) -> dict:
    """Read ROOT/manifest.json and check that it describes a complete synthetic dataset."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {root} is not a complete synthetic dataset (run `slfer-parse synth --out {root}` first)"
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} has format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    return manifest
