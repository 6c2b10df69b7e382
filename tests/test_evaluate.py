"""Tests of slfer.evaluate and the ``slfer evaluate`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slfer.cli import main
from slfer.evaluate import classification_metrics, evaluate_model_file, load_model_file
from slfer.train import TrainConfig, train
from test_data import write_tiny_dataset


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path]:
    """Return (run folder, cache) of a one-epoch baseline run on a tiny dataset."""
    folder = tmp_path_factory.mktemp("evaluate")
    cache, _ = write_tiny_dataset(folder / "data", size=32, train_per_class=2, test_per_class=2, seed=5)
    config = TrainConfig(
        cache=str(cache),
        archive=None,
        out=str(folder / "run"),
        variant="baseline",
        seed=1,
        backbone_weights="none",
        epochs=1,
        batch_size=7,
        lr=1e-3,
        crop_size=28,
        device="cpu",
    )
    train(config)
    return folder / "run", cache


def test_evaluate_reproduces_run_metrics(finished_run, tmp_path):
    run, cache = finished_run
    out = tmp_path / "evaluation"
    assert main(["evaluate", "--checkpoint", str(run / "model.pt"), "--cache", str(cache), "--out", str(out), "--device", "cpu"]) == 0

    run_metrics = json.loads((run / "metrics.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "mean_class_accuracy", "per_class_accuracy", "confusion_matrix", "class_names", "num_test_images"):
        assert metrics[key] == run_metrics[key], key
    assert metrics["split"] == "test"
    assert (out / "predictions.csv").read_text() == (run / "predictions.csv").read_text()
    with np.load(out / "features.npz") as evaluated, np.load(run / "features.npz") as trained:
        assert np.array_equal(evaluated["features"], trained["features"])
        assert np.array_equal(evaluated["predictions"], trained["predictions"])


def test_evaluate_rejects_other_image_size(finished_run, tmp_path):
    run, _ = finished_run
    other_cache, _ = write_tiny_dataset(tmp_path, size=40, train_per_class=1, test_per_class=1)
    with pytest.raises(ValueError, match="stores 40 px images, but model .* was trained on 32 px"):
        evaluate_model_file(run / "model.pt", other_cache, tmp_path / "out")


def test_evaluate_rejects_other_class_names(finished_run, tmp_path):
    run, cache = finished_run
    record = torch.load(run / "model.pt", weights_only=True)
    record["class_names"] = list(reversed(record["class_names"]))
    renamed = tmp_path / "renamed.pt"
    torch.save(record, renamed)
    with pytest.raises(ValueError, match="has expression classes .* but model .* was trained on"):
        evaluate_model_file(renamed, cache, tmp_path / "out")


def test_load_model_file_rejects_checkpoint(finished_run, tmp_path):
    # A finished run deletes its checkpoint, so stop one after its first of two epochs.
    _, cache = finished_run
    config = TrainConfig(
        cache=str(cache), archive=None, out=str(tmp_path / "stopped"), variant="baseline", seed=1,
        backbone_weights="none", epochs=2, batch_size=7, lr=1e-3, crop_size=28, device="cpu",
    )
    assert train(config, stop_after=1) is None
    with pytest.raises(ValueError, match="is not a slfer model file"):
        load_model_file(tmp_path / "stopped" / "checkpoint.pt", torch.device("cpu"))


def test_load_model_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="model file .* not found"):
        load_model_file(tmp_path / "model.pt", torch.device("cpu"))


def test_classification_metrics_counts():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predictions = np.array([0, 0, 1, 1, 0, 2])
    metrics = classification_metrics(labels, predictions, ["a", "b", "c", "d"])
    assert metrics["confusion_matrix"] == [[2, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["per_class_accuracy"] == {"a": pytest.approx(2 / 3), "b": 0.5, "c": 1.0, "d": None}
    # Class "d" has no test images, so it is left out of the mean.
    assert metrics["mean_class_accuracy"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    assert metrics["num_test_images"] == 6
