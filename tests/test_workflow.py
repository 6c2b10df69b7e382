"""Tests of the Snakemake workflow, run as a subprocess against folders under tmp_path.

The dry runs use tiny RAF-DB- and SFEW-shaped trees and empty weight files. The
shared-archive and demo tests really execute the rules on a shrunken demo
configuration (32 px, a few images per class, one epoch, two seeds).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fakes_datasets import make_rafdb_tree, make_sfew_tree

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"

pytestmark = pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake is not installed")


def snakemake(workdir: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run snakemake on the repository's Snakefile in ``workdir``; return the finished process."""
    command = ["snakemake", "-s", str(SNAKEFILE), "--directory", str(workdir), "--cores", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=workdir)


def planned_jobs(output: str) -> list[tuple[str, list[str]]]:
    """Parse a dry run's job listing into (rule name, outputs) pairs, one per job."""
    jobs = []
    rule = None
    for line in output.splitlines():
        match = re.match(r"^(?:local)?rule (\w+):$", line)
        if match:
            rule = match.group(1)
            continue
        match = re.match(r"^\s+output: (.*)$", line)
        if match and rule is not None:
            jobs.append((rule, [path.strip() for path in match.group(1).split(",")]))
            rule = None
    return jobs


@pytest.fixture()
def paper_workdir(tmp_path: Path) -> Path:
    """A folder with config.yaml, tiny RAF-DB and SFEW trees and empty weight files."""
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    make_rafdb_tree(tmp_path / "data" / "RAF-DB" / "basic")
    make_sfew_tree(tmp_path / "data" / "SFEW2")
    (tmp_path / "resources").mkdir()
    (tmp_path / "resources" / "resnet18_msceleb.pth").write_bytes(b"")
    (tmp_path / "resources" / "parsing_bisenet.pth").write_bytes(b"")
    return tmp_path


def expected_paper_runs() -> set[str]:
    """Metrics paths of every paper cell, derived here from config.yaml independently of common.smk."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    runs = set()
    for dataset in ("rafdb", "sfew"):
        for variant in ("baseline", "ct", "st", "ct_st", "proposed"):
            runs.add((dataset, variant))
        for value in ("0", "0.001", "0.1", "1"):
            runs.add((dataset, f"proposed_l1-{value}"))
            runs.add((dataset, f"proposed_l2-{value}"))
        for n in (1, 2, 3, 5, 6, 7, 8):
            runs.add((dataset, f"proposed_n{n}"))
    return {
        f"results/runs/{dataset}/{run}/seed{seed}/metrics.json"
        for dataset, run in runs
        for seed in config["seeds"]
    }


def test_lint_paper_and_demo_configs():
    for extra in ([], [f"--configfile={REPO / 'config.demo.yaml'}"]):
        result = subprocess.run(
            ["snakemake", "-s", str(SNAKEFILE), "--lint", *extra],
            capture_output=True, text=True, timeout=120, cwd=REPO,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Lints for" not in result.stdout + result.stderr


def test_dry_run_plans_each_cell_once(paper_workdir):
    result = snakemake(paper_workdir, "-n")
    assert result.returncode == 0, result.stderr
    jobs = planned_jobs(result.stdout)
    counts = Counter(rule for rule, _ in jobs)
    assert counts["image_cache"] == 2
    assert counts["parse_masks"] == 2
    assert counts["download_parser_weights"] == 0
    assert counts["table"] == 4
    assert counts["figure3"] == 1
    assert counts["figure4"] == 1
    assert counts["figure5"] == 1

    metrics = [outputs[0] for rule, outputs in jobs if rule == "train"]
    assert len(metrics) == len(set(metrics))
    assert set(metrics) == expected_paper_runs()
    assert len(metrics) == 40 * 3


def test_one_cell_plans_only_its_inputs(paper_workdir):
    target = "results/runs/sfew/proposed_l1-0.1/seed2/metrics.json"
    result = snakemake(paper_workdir, "-n", target)
    assert result.returncode == 0, result.stderr
    jobs = planned_jobs(result.stdout)
    assert sorted(rule for rule, _ in jobs) == ["image_cache", "parse_masks", "train"]
    train_outputs = [outputs for rule, outputs in jobs if rule == "train"][0]
    assert train_outputs[0] == target
    assert "results/data/sfew/images.h5" in [outputs[0] for rule, outputs in jobs if rule == "image_cache"]


def test_non_canonical_run_id_rejected(paper_workdir):
    result = snakemake(paper_workdir, "-n", "results/runs/rafdb/proposed_l1-0.5/seed1/metrics.json")
    assert result.returncode != 0
    assert "not canonical" in result.stdout + result.stderr
    assert "'proposed'" in result.stdout + result.stderr


def test_unknown_config_key_rejected(paper_workdir):
    config = yaml.safe_load((paper_workdir / "config.yaml").read_text())
    config["training"]["epoch"] = 3
    (paper_workdir / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(paper_workdir, "-n")
    assert result.returncode != 0
    assert "epoch" in result.stdout + result.stderr
    assert "Additional properties are not allowed" in result.stdout + result.stderr


def test_missing_backbone_checkpoint_stops_workflow(paper_workdir):
    (paper_workdir / "resources" / "resnet18_msceleb.pth").unlink()
    result = snakemake(paper_workdir, "results/table1.csv")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "resources/resnet18_msceleb.pth" in output
    assert "DAN" in output
    assert "ijba_res18_naive.pth.tar" in output
    assert "imagenet" in output
    assert not (paper_workdir / "results").exists()


def test_demo_configfile_replaces_paper_config(paper_workdir):
    # config.yaml sits in the working directory too: its datasets must not leak into the demo.
    result = snakemake(paper_workdir, "-n", f"--configfile={REPO / 'config.demo.yaml'}", "results/table1.csv")
    assert result.returncode == 0, result.stderr
    outputs = [path for _, paths in planned_jobs(result.stdout) for path in paths]
    assert any("synth_rafdb" in path for path in outputs)
    assert not any("/rafdb/" in path or "/sfew/" in path for path in outputs)
    assert "resnet18_msceleb.pth" not in result.stdout + result.stderr


def test_missing_dataset_folder_named(paper_workdir):
    shutil.rmtree(paper_workdir / "data" / "SFEW2")
    result = snakemake(paper_workdir, "-n", "results/data/sfew/images.h5")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "data/SFEW2" in output
    assert "datasets.sfew.root" in output


def test_missing_checkpoint_ignored_without_training(paper_workdir):
    (paper_workdir / "resources" / "resnet18_msceleb.pth").unlink()
    result = snakemake(paper_workdir, "-n", "results/figure5.png")
    assert result.returncode == 0, result.stdout + result.stderr


def tiny_demo_config() -> dict:
    """config.demo.yaml shrunk to 32 px, 4 train and 2 test images per class, 1 epoch, 2 seeds."""
    config = yaml.safe_load((REPO / "config.demo.yaml").read_text())
    for spec in config["datasets"].values():
        spec["synth"].update(size=32, train_per_class=4, test_per_class=2)
    config["training"].update(image_size=32, crop_size=32, epochs=1, batch_size=8)
    config["seeds"] = [1, 2]
    return config


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory) -> Path:
    """A folder where the shrunken demo's Table 1 has been built."""
    if shutil.which("slfer-parse") is None or shutil.which("slfer") is None:
        pytest.skip("the slfer console scripts are not installed")
    workdir = tmp_path_factory.mktemp("demo")
    (workdir / "demo.yaml").write_text(yaml.safe_dump(tiny_demo_config()))
    result = snakemake(workdir, "--configfile=demo.yaml", "results/table1.csv", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_demo_table1_complete(demo_workdir):
    config = tiny_demo_config()
    frame = pd.read_csv(demo_workdir / "results" / "table1.csv")
    datasets = list(config["datasets"])
    variants = config["experiments"]["table1"]["variants"]
    assert len(frame) == len(datasets) * len(variants)
    assert set(zip(frame["row"], frame["dataset"])) == {(v, d) for v in variants for d in datasets}
    for seed in config["seeds"]:
        assert frame[f"accuracy_seed{seed}"].between(0, 100).all()
        assert frame[f"mean_class_accuracy_seed{seed}"].between(0, 100).all()
    assert frame["paper_accuracy"].notna().all()
    assert frame["note"].str.contains("synthetic").all()
    markdown = (demo_workdir / "results" / "table1.md").read_text()
    assert markdown.startswith("# Demo on synthetic faces")


def shared_archive_config(archive: str) -> dict:
    config = tiny_demo_config()
    config["datasets"]["synth_rafdb"]["archive"] = archive
    return config


@pytest.mark.slow
def test_mismatched_shared_archive_refused(demo_workdir):
    # The SFEW stand-in's archive describes other images than the RAF-DB stand-in's cache.
    foreign = demo_workdir / "results" / "data" / "synth_sfew" / "parsed" / "masks.h5"
    (demo_workdir / "shared.yaml").write_text(yaml.safe_dump(shared_archive_config(str(foreign))))
    target = "results/data/synth_rafdb/imported/masks.h5"
    result = snakemake(demo_workdir, "--configfile=shared.yaml", target)
    assert result.returncode != 0
    assert not (demo_workdir / target).exists()
    log = (demo_workdir / "results" / "logs" / "import_archive" / "synth_rafdb.log").read_text()
    assert "synth_sfew" in log


@pytest.mark.slow
def test_matching_shared_archive_imported(demo_workdir):
    own = demo_workdir / "results" / "data" / "synth_rafdb" / "parsed" / "masks.h5"
    (demo_workdir / "shared.yaml").write_text(yaml.safe_dump(shared_archive_config(str(own))))
    target = "results/data/synth_rafdb/imported/masks.h5"
    result = snakemake(demo_workdir, "--configfile=shared.yaml", target)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (demo_workdir / target).read_bytes() == own.read_bytes()
