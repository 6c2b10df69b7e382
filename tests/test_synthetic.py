"""Tests for the synthetic face dataset: determinism, layout, label maps, label noise and CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from parsing.labels import EXPRESSIONS, FACE_PARTS_19
from parsing.synthetic import (
    FaceParams,
    add_commands,
    generate_dataset,
    read_manifest,
    render_face,
    render_task,
    sample_face_params,
)
from parsing.synthetic.dataset import ImageTask, plan_split
from parsing.synthetic.faces import DIFFICULTY_PRESETS, GeneratorConfig, generator_config_for

PART = {name: index for index, name in enumerate(FACE_PARTS_19)}
SIZE = 48


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for kind in ("images", "labels")
        for path in sorted((root / kind).rglob("*"))
        if path.is_file()
    }


def _read_labels(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def _read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "data"
    manifest = generate_dataset(root, seed=7, size=SIZE, train_per_class=3, test_per_class=2, label_noise=0.2)
    return root, manifest


def test_same_seed_identical_across_workers(dataset, tmp_path):
    root, manifest = dataset
    again = tmp_path / "again"
    manifest_again = generate_dataset(again, seed=7, size=SIZE, train_per_class=3, test_per_class=2,
                                      label_noise=0.2, workers=2)
    first, second = _files(root), _files(again)
    assert len(first) == 2 * 7 * (3 + 2)
    assert first.keys() == second.keys()
    different = [name for name in first if first[name] != second[name]]
    assert different == []
    assert manifest_again == manifest
    assert (again / "manifest.json").read_bytes() == (root / "manifest.json").read_bytes()


def test_different_seed_changes_images(dataset, tmp_path):
    root, _ = dataset
    other = tmp_path / "other"
    generate_dataset(other, seed=8, size=SIZE, train_per_class=3, test_per_class=2, label_noise=0.2)
    first, second = _files(root), _files(other)
    same = [name for name in first if name.startswith("images") and first[name] == second.get(name)]
    assert same == []


def test_every_class_in_both_splits(dataset):
    root, manifest = dataset
    requested = {"train": 3, "test": 2}
    for split, per_class in requested.items():
        for expression in EXPRESSIONS:
            images = sorted(p.name for p in (root / "images" / split / expression).glob("*.png"))
            labels = sorted(p.name for p in (root / "labels" / split / expression).glob("*.png"))
            assert len(images) == per_class, (split, expression)
            assert labels == images, (split, expression)
            assert manifest["counts"][split][expression] == per_class
    assert read_manifest(root) == manifest
    leftovers = [p for p in root.rglob("*") if ".tmp" in p.name]
    assert leftovers == []


def test_label_maps_hold_valid_ids(dataset):
    root, _ = dataset
    seen = set()
    for path in sorted((root / "labels").rglob("*.png")):
        labels = _read_labels(path)
        assert labels.dtype == np.uint8, path
        assert labels.shape == (SIZE, SIZE), path
        assert labels.max() < len(FACE_PARTS_19), path
        image = _read_rgb(root / "images" / path.relative_to(root / "labels"))
        assert image.shape == (SIZE, SIZE, 3)
        seen.update(np.unique(labels).tolist())
    # The core parts appear in every dataset; accessories appear in most.
    for part in ("background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "nose", "u_lip", "l_lip", "neck", "cloth", "hair"):
        assert PART[part] in seen, part


def test_accessories_cover_all_classes():
    """Over enough faces, every one of the 19 classes is drawn."""
    rng = np.random.default_rng(0)
    seen = set()
    for index in range(70):
        params = sample_face_params(rng, index % len(EXPRESSIONS), 64)
        _, labels = render_face(params, 64, rng)
        seen.update(np.unique(labels).tolist())
    assert seen == set(range(len(FACE_PARTS_19)))


def _plain_face(**changes) -> FaceParams:
    """Return a frontal face with flat lighting and no camera effects."""
    params = FaceParams(
        expression=EXPRESSIONS.index("surprise"), mouth_open=0.3, teeth=0.0, skin_rgb=(230, 180, 140),
        lip_rgb=(180, 60, 70), background_rgb=(90, 160, 90), cloth_rgb=(40, 60, 120), hair_rgb=(40, 30, 20),
    )
    return dataclasses.replace(params, **changes)


def _core(labels: np.ndarray, part: int) -> np.ndarray:
    """Return pixels of ``part`` away from its edges, where anti-aliasing cannot mix colours."""
    region = (labels == part).astype(np.uint8)
    return cv2.erode(region, np.ones((3, 3), np.uint8)).astype(bool)


def test_mouth_labels_match_drawn_mouth():
    params = _plain_face()
    image, labels = render_face(params, 192, np.random.default_rng(0))
    mouth = _core(labels, PART["mouth"])
    lower_lip = _core(labels, PART["l_lip"])
    assert mouth.sum() > 20
    assert lower_lip.sum() > 10
    # Inner mouth and lower lip are drawn in flat colours, so their cores match exactly.
    assert np.all(image[mouth] == (70, 20, 28))
    assert np.all(image[lower_lip] == params.lip_rgb)
    skin = image[_core(labels, PART["skin"])].astype(float).mean(axis=0)
    assert np.abs(image[mouth].astype(float).mean(axis=0) - skin).sum() > 150


def test_mouth_region_follows_geometry():
    """Opening the mouth grows the mouth class; a closed mouth has none."""
    _, closed = render_face(_plain_face(mouth_open=0.0), 128, np.random.default_rng(0))
    _, small = render_face(_plain_face(mouth_open=0.1), 128, np.random.default_rng(0))
    _, wide = render_face(_plain_face(mouth_open=0.35), 128, np.random.default_rng(0))
    assert (closed == PART["mouth"]).sum() == 0
    assert 0 < (small == PART["mouth"]).sum() < (wide == PART["mouth"]).sum()


def test_left_parts_on_image_right():
    """As in CelebAMask-HQ, the subject's left parts appear on the image's right side."""
    _, labels = render_face(_plain_face(), 128, np.random.default_rng(0))
    columns = np.arange(128)[None, :].repeat(128, axis=0)
    for left, right in (("l_eye", "r_eye"), ("l_brow", "r_brow"), ("l_ear", "r_ear")):
        assert columns[labels == PART[left]].mean() > 64, left
        assert columns[labels == PART[right]].mean() < 64, right


def test_dataset_mouth_differs_from_skin(dataset):
    """Even with noise, blur and JPEG artefacts, labelled lips are redder than labelled skin."""
    root, _ = dataset
    redder = []
    for path in sorted((root / "labels").rglob("*.png")):
        labels = _read_labels(path)
        image = _read_rgb(root / "images" / path.relative_to(root / "labels")).astype(float)
        lips = np.isin(labels, (PART["u_lip"], PART["l_lip"]))
        skin = labels == PART["skin"]
        redness = image[..., 0] - image[..., 1]  # red minus green
        redder.append(redness[lips].mean() > redness[skin].mean())
    assert np.mean(redder) >= 0.9


def test_plan_honours_label_noise():
    tasks = plan_split(seed=1, split="train", per_class=100, label_noise=0.15)
    noisy = [task for task in tasks if task.label != task.true_label]
    assert len(tasks) == 700
    assert len(noisy) == 105
    stored = np.bincount([task.label for task in tasks], minlength=7)
    assert stored.tolist() == [100] * 7
    drawn = np.bincount([task.true_label for task in tasks], minlength=7)
    assert drawn.min() >= 80


def test_manifest_lists_noisy_images(dataset):
    root, manifest = dataset
    noisy = manifest["noisy_labels"]
    assert len([e for e in noisy if e["split"] == "train"]) == round(0.2 * 21)
    assert len([e for e in noisy if e["split"] == "test"]) == round(0.2 * 14)
    entry = noisy[0]
    assert entry["label"] != entry["true_label"]
    assert entry["name"].split("/")[1] == entry["label"]
    # The stored image really shows the true class: drawing that task again gives the same pixels.
    split, _, stem = entry["name"].split("/")
    task = ImageTask(split, int(Path(stem).stem), EXPRESSIONS.index(entry["label"]), EXPRESSIONS.index(entry["true_label"]))
    image, labels = render_task(task, seed=7, size=SIZE, config=GeneratorConfig())
    assert np.array_equal(_read_rgb(root / "images" / entry["name"]), image)
    assert np.array_equal(_read_labels(root / "labels" / entry["name"]), labels)


def test_expression_geometry_by_class():
    rng = np.random.default_rng(3)
    samples = {
        expression: [sample_face_params(rng, index, 64) for _ in range(100)]
        for index, expression in enumerate(EXPRESSIONS)
    }

    def mean_of(expression: str, field: str) -> float:
        return float(np.mean([getattr(params, field) for params in samples[expression]]))

    assert mean_of("happy", "mouth_corner") > mean_of("neutral", "mouth_corner") > mean_of("sad", "mouth_corner")
    assert mean_of("surprise", "mouth_open") > mean_of("fear", "mouth_open") > mean_of("neutral", "mouth_open")
    assert mean_of("surprise", "brow_raise") > mean_of("neutral", "brow_raise") > mean_of("angry", "brow_raise")
    assert mean_of("sad", "brow_inner") > mean_of("neutral", "brow_inner") > mean_of("angry", "brow_inner")
    assert mean_of("disgust", "nose_wrinkle") > mean_of("angry", "nose_wrinkle") > mean_of("happy", "nose_wrinkle")
    assert mean_of("fear", "eye_open") > mean_of("neutral", "eye_open") > mean_of("angry", "eye_open")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seed": -1}, "seed"),
        ({"size": 8}, "image size"),
        ({"label_noise": 1.0}, "label_noise"),
        ({"train_per_class": 0}, "train_per_class"),
        ({"workers": -2}, "workers"),
    ],
)
def test_invalid_arguments_rejected(tmp_path, changes, message):
    arguments = {"seed": 0, "size": SIZE, "train_per_class": 1, "test_per_class": 1} | changes
    with pytest.raises(ValueError, match=message):
        generate_dataset(tmp_path / "data", **arguments)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slfer-parse")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_writes_dataset_and_figure(tmp_path):
    parser = _parser()
    root = tmp_path / "data"
    args = parser.parse_args(["synth", "--out", str(root), "--seed", "2", "--size", "40",
                              "--train-per-class", "2", "--test-per-class", "1", "--label-noise", "0"])
    assert args.func(args) == 0
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["size"] == 40
    assert manifest["noisy_labels"] == []

    figure_path = tmp_path / "figures" / "grid.png"
    args = parser.parse_args(["synth-figure", "--root", str(root), "--out", str(figure_path), "--columns", "2"])
    assert args.func(args) == 0
    figure = cv2.imread(str(figure_path))
    assert figure is not None
    assert figure.shape[0] > 300
    assert figure.shape[1] > 300
    assert list(figure_path.parent.iterdir()) == [figure_path]


def test_difficulty_presets():
    assert generator_config_for("standard") == GeneratorConfig()
    easy = generator_config_for("easy")
    standard = GeneratorConfig()
    assert easy.intensity_range[0] > standard.intensity_range[0]
    assert easy.max_roll_deg < standard.max_roll_deg
    assert easy.max_clutter_shapes < standard.max_clutter_shapes
    assert set(DIFFICULTY_PRESETS) == {"standard", "easy"}
    with pytest.raises(ValueError, match="hard"):
        generator_config_for("hard")


def test_cli_difficulty_in_manifest(tmp_path):
    parser = _parser()
    root = tmp_path / "easy"
    args = parser.parse_args(["synth", "--out", str(root), "--seed", "2", "--size", "32", "--train-per-class", "1",
                              "--test-per-class", "1", "--difficulty", "easy"])
    assert args.func(args) == 0
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["config"]["intensity_range"] == list(generator_config_for("easy").intensity_range)


def test_cli_rejects_existing_dataset(tmp_path, caplog):
    parser = _parser()
    root = tmp_path / "data"
    command = ["synth", "--out", str(root), "--seed", "2", "--size", "32", "--train-per-class", "1", "--test-per-class", "1"]
    args = parser.parse_args(command)
    assert args.func(args) == 0
    args = parser.parse_args(command)
    assert args.func(args) == 1
    assert "--overwrite" in caplog.text
    args = parser.parse_args(command + ["--overwrite"])
    assert args.func(args) == 0


def test_partial_folder_not_complete(tmp_path):
    """A folder without a manifest is incomplete: the figure refuses it and synth will not reuse it."""
    root = tmp_path / "data"
    (root / "images" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(root)
    with pytest.raises(FileExistsError, match="images"):
        generate_dataset(root, seed=0, size=32, train_per_class=1, test_per_class=1)
