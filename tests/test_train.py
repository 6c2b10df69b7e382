"""Tests of slfer.train and the ``slfer train`` command: schedule, outputs, resume, data parallel."""

from __future__ import annotations

import csv
import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from slfer.cli import build_parser, main, resolve_train_config
from parsing.archive import top_n_labels
from slfer.data import Batch
from slfer.train import EPOCH_COLUMNS, Runtime, TrainConfig, build, component_targets, resolve_runtime, train
from test_data import write_tiny_dataset

TIMING_COLUMNS = {"images_per_s", "seconds", "peak_memory_mib"}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_dataset(tmp_path_factory.mktemp("data"), size=32, train_per_class=2, test_per_class=1)


def _train_args(cache: Path, archive: Path, out: Path, *extra: str) -> list[str]:
    # 14 training images in batches of 7 at 28 px: two steps per epoch.
    return [
        "train", "--cache", str(cache), "--archive", str(archive), "--out", str(out),
        "--variant", "proposed", "--seed", "3", "--backbone-weights", "none",
        "--epochs", "3", "--batch-size", "7", "--crop-size", "28", "--milestones", "1", "2",
        "--lr", "1e-3", "--device", "cpu", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def full_run(tiny_data, tmp_path_factory) -> Path:
    cache, archive = tiny_data
    out = tmp_path_factory.mktemp("runs") / "full"
    assert main(_train_args(cache, archive, out)) == 0
    return out


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def test_lr_schedule_paper_milestones(tmp_path):
    config = TrainConfig(
        cache="unused.h5", archive=None, out=str(tmp_path), variant="baseline", seed=0, backbone_weights="none"
    )
    runtime = Runtime(
        device=torch.device("cpu"), autocast_dtype=None, use_grad_scaler=False, channels_last=False, deterministic=True
    )
    state = build(config, runtime, num_expressions=7)
    lr_per_epoch = {}
    for epoch in range(1, config.epochs + 1):
        lr_per_epoch[epoch] = state.optimizer.param_groups[0]["lr"]  # read before the epoch, as train() does
        state.optimizer.step()  # no gradients, so no update; keeps the scheduler's step-order check quiet
        state.scheduler.step()

    expected = {}
    for epoch in range(1, 41):
        expected[epoch] = 1e-4 * 0.1 ** sum(epoch > milestone for milestone in (10, 18, 25, 32))
    for epoch in range(1, 41):
        assert lr_per_epoch[epoch] == pytest.approx(expected[epoch], rel=1e-9), f"epoch {epoch}"
    assert lr_per_epoch[10] == pytest.approx(1e-4)
    assert lr_per_epoch[11] == pytest.approx(1e-5)
    assert lr_per_epoch[18] == pytest.approx(1e-5)
    assert lr_per_epoch[19] == pytest.approx(1e-6)
    assert lr_per_epoch[33] == pytest.approx(1e-8)


def test_run_writes_outputs(full_run):
    for name in ("config.json", "epochs.csv", "metrics.json", "predictions.csv", "features.npz", "model.pt"):
        assert (full_run / name).is_file(), name
    assert not (full_run / "checkpoint.pt").exists(), "a finished run keeps no resume state"
    assert not list(full_run.glob(".*.tmp-*")), "temporary files left behind"

    rows = _read_csv(full_run / "epochs.csv")
    assert tuple(rows[0].keys()) == EPOCH_COLUMNS
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3]
    assert [float(row["lr"]) for row in rows] == pytest.approx([1e-3, 1e-4, 1e-5])
    for row in rows:
        assert float(row["loss_st"]) > 0
        assert float(row["loss_ct"]) > 0
        assert float(row["images_per_s"]) > 0
        assert float(row["peak_memory_mib"]) > 0

    config = json.loads((full_run / "config.json").read_text())
    assert config["variant"] == "proposed"
    assert config["runtime"]["device"] == "cpu"
    assert config["torch_version"] == torch.__version__
    assert config["model_config"]["se"] is True
    assert config["data"]["num_train_images"] == 14

    metrics = json.loads((full_run / "metrics.json").read_text())
    assert metrics["epochs"] == 3
    assert metrics["accuracy"] == pytest.approx(float(rows[-1]["test_accuracy"]))
    assert metrics["best_epoch_on_test"]["note"].startswith("not the reported figure")
    assert metrics["num_test_images"] == 7
    assert np.asarray(metrics["confusion_matrix"]).shape == (7, 7)

    predictions = _read_csv(full_run / "predictions.csv")
    assert len(predictions) == 7
    assert list(predictions[0])[:3] == ["name", "label", "prediction"]
    assert list(predictions[0])[3] == "prob_angry"

    with np.load(full_run / "features.npz") as features:
        assert features["features"].shape == (7, 128)
        assert features["features"].dtype == np.float32
        assert features["names"].tolist() == [row["name"] for row in predictions]


def test_model_file_loads_weights_only(full_run):
    record = torch.load(full_run / "model.pt", weights_only=True)
    assert record["format"] == "slfer-model"
    assert record["class_names"][0] == "angry"
    assert all(isinstance(value, torch.Tensor) for value in record["state_dict"].values())


def test_resume_matches_uninterrupted(tiny_data, full_run, tmp_path):
    cache, archive = tiny_data
    out = tmp_path / "resumed"
    assert main(_train_args(cache, archive, out, "--stop-after", "2")) == 0
    assert (out / "checkpoint.pt").is_file()
    assert not (out / "metrics.json").exists()
    assert len(_read_csv(out / "epochs.csv")) == 2

    assert main(_train_args(cache, archive, out)) == 0
    resumed = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    uninterrupted = torch.load(full_run / "model.pt", weights_only=True)["state_dict"]
    assert resumed.keys() == uninterrupted.keys()
    for key in uninterrupted:
        assert torch.equal(resumed[key], uninterrupted[key]), key

    resumed_metrics = json.loads((out / "metrics.json").read_text())
    full_metrics = json.loads((full_run / "metrics.json").read_text())
    assert resumed_metrics == full_metrics
    for resumed_row, full_row in zip(_read_csv(out / "epochs.csv"), _read_csv(full_run / "epochs.csv"), strict=True):
        for column in set(EPOCH_COLUMNS) - TIMING_COLUMNS:
            assert resumed_row[column] == full_row[column], column
    assert (out / "predictions.csv").read_text() == (full_run / "predictions.csv").read_text()


def test_resume_rejects_changed_settings(tiny_data, tmp_path):
    cache, archive = tiny_data
    out = tmp_path / "stopped"
    assert main(_train_args(cache, archive, out, "--stop-after", "1")) == 0
    config = resolve_train_config(build_parser().parse_args(_train_args(cache, archive, out, "--lr", "5e-4")))
    with pytest.raises(ValueError, match=r"settings differ \(lr: checkpoint 0.001, now 0.0005\)"):
        train(config)


def test_finished_run_retrains_when_rerun(tiny_data, full_run, tmp_path):
    # What `snakemake --force` does to a finished run: delete its outputs, run the command again.
    cache, archive = tiny_data
    out = tmp_path / "rerun"
    shutil.copytree(full_run, out)
    for name in ("metrics.json", "epochs.csv", "predictions.csv", "features.npz", "model.pt", "config.json"):
        (out / name).unlink()
    assert main(_train_args(cache, archive, out)) == 0
    assert len(_read_csv(out / "epochs.csv")) == 3
    assert json.loads((out / "metrics.json").read_text()) == json.loads((full_run / "metrics.json").read_text())
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.slow
def test_synthetic_faces_beat_chance(tmp_path):
    # The project's own synthetic faces (easy preset, 32 px): the expression is in the
    # geometry of mouth, brows and eyes, not in a colour code. Measured 0.276 here.
    from parsing.cache import build_cache
    from parsing.datasets import read_dataset
    from parsing.synthetic import generate_dataset
    from parsing.synthetic.faces import generator_config_for

    root = tmp_path / "synth"
    generate_dataset(root, seed=5, size=32, train_per_class=40, test_per_class=15, label_noise=0.0,
                     config=generator_config_for("easy"))
    cache = build_cache(read_dataset("folder", root / "images"), tmp_path / "cache.h5", "synth", size=32)
    config = TrainConfig(
        cache=str(cache), archive=None, out=str(tmp_path / "run"), variant="baseline", seed=0,
        backbone_weights="none", epochs=8, batch_size=16, lr=2e-3, milestones=(6,), crop_size=28, device="cpu",
    )
    metrics = train(config)
    chance = 1 / 7
    assert metrics["accuracy"] >= chance + 0.05


def test_variant_with_masks_needs_archive(tmp_path):
    with pytest.raises(ValueError, match="needs --archive"):
        TrainConfig(cache="c.h5", archive=None, out=str(tmp_path), variant="st", seed=0, backbone_weights="none")


def test_config_file_and_flag_override(tmp_path):
    config_path = tmp_path / "run.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {"cache": "c.h5", "archive": "a.h5", "variant": "ct", "seed": 4, "backbone_weights": "none", "lr": 0.01,
             "milestones": [5, 9]}  # fmt: skip
        )
    )
    args = build_parser().parse_args(["train", "--config", str(config_path), "--out", "run", "--lr", "0.002"])
    config = resolve_train_config(args)
    assert config.lr == 0.002
    assert config.milestones == (5, 9)
    assert config.variant == "ct"
    assert config.epochs == 40


def test_config_file_unknown_key(tmp_path):
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump({"cache": "c.h5", "learning_rate": 0.1}))
    args = build_parser().parse_args(["train", "--config", str(config_path)])
    with pytest.raises(ValueError, match=r"unknown keys \['learning_rate'\]"):
        resolve_train_config(args)


def test_backbone_weights_required(tmp_path, caplog):
    argv = ["train", "--cache", "c.h5", "--out", str(tmp_path), "--variant", "baseline", "--seed", "0"]
    assert main(argv) == 2
    assert "--backbone-weights" in caplog.text


@pytest.mark.slow
def test_torchrun_two_processes(tiny_data, tmp_path):
    cache, archive = tiny_data
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "slfer.cli", "train", "--cache", str(cache), "--archive", str(archive), "--out", str(out),
        "--variant", "ct_st", "--seed", "0", "--backbone-weights", "none", "--epochs", "1",
        "--batch-size", "4", "--crop-size", "28", "--device", "cpu",
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=180, env=environment)
    assert completed.returncode == 0, completed.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["runtime"]["world_size"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_train_images"] == 14
    rows = _read_csv(out / "epochs.csv")
    assert len(rows) == 1
    assert float(rows[0]["loss"]) > 0


def test_crop_component_targets_match_archive_rule():
    generator = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 8, (5, 12, 12), generator=generator)
    masks[0] = 1  # a single present class: only it is marked
    masks[1, :, :6] = 3  # equal counts of classes 3 and 7: both marked, since n = 4
    masks[1, :, 6:] = 7
    batch = Batch(images=torch.zeros(5, 3, 12, 12), labels=torch.zeros(5, dtype=torch.long), indices=torch.arange(5))
    batch.masks8 = masks
    batch.topn = torch.ones(5, 8)
    config = TrainConfig(
        cache="c.h5", archive="a.h5", out="run", variant="ct", seed=0, backbone_weights="none", ct_labels="crop"
    )
    counts = np.stack([np.bincount(mask.ravel(), minlength=8) for mask in masks.numpy()])
    targets = component_targets(batch, config, has_ct=True)
    assert np.array_equal(targets.numpy(), top_n_labels(counts, 4).astype(np.float32))
    assert targets[0].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]

    config.ct_labels = "archive"
    assert torch.equal(component_targets(batch, config, has_ct=True), batch.topn)
    assert component_targets(batch, config, has_ct=False) is None


def test_runtime_on_cpu(tmp_path):
    config = TrainConfig(cache="c.h5", archive=None, out=str(tmp_path), variant="baseline", seed=0, backbone_weights="none", device="cpu")
    runtime = resolve_runtime(config)
    assert runtime.device.type == "cpu"
    assert runtime.autocast_dtype is None
    assert runtime.channels_last is False
    assert runtime.deterministic is True
    config.amp = "fp16"
    with pytest.raises(ValueError, match="--amp fp16 needs a CUDA device"):
        resolve_runtime(config)
