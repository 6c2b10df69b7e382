"""Tests of slfer.report: tables built from run folders that the tests write themselves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from slfer import paper, report


def write_metrics(run_dir: Path, seed: int, accuracy: float, mean_class_accuracy: float) -> None:
    folder = run_dir / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {
        "accuracy": accuracy,
        "mean_class_accuracy": mean_class_accuracy,
        "num_test_images": 100,
        "seed": seed,
        "variant": run_dir.name,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture()
def datasets() -> list[report.DatasetColumn]:
    return [
        report.DatasetColumn(name="rafdb", paper_key="rafdb", title="RAF-DB"),
        report.DatasetColumn(name="sfew", paper_key="sfew", title="SFEW"),
    ]


def table1_cells(runs: Path) -> list[report.Cell]:
    return [
        report.Cell(row=variant, dataset=dataset, run_dir=runs / dataset / variant)
        for variant in ("baseline", "proposed")
        for dataset in ("rafdb", "sfew")
    ]


def fill_runs(runs: Path, seeds: list[int]) -> dict[tuple[str, str], list[float]]:
    """Write metrics for baseline/proposed on both datasets; return the accuracies written (%)."""
    written = {}
    for offset, (variant, dataset) in enumerate(
        [("baseline", "rafdb"), ("baseline", "sfew"), ("proposed", "rafdb"), ("proposed", "sfew")]
    ):
        values = []
        for index, seed in enumerate(seeds):
            accuracy = 0.5 + 0.1 * offset + 0.01 * index
            write_metrics(runs / dataset / variant, seed, accuracy, accuracy - 0.05)
            values.append(100 * accuracy)
        written[(variant, dataset)] = values
    return written


def test_table1_mean_std_and_seeds(tmp_path, datasets):
    seeds = [1, 2, 3]
    written = fill_runs(tmp_path, seeds)
    frame = report.build_table("table1", table1_cells(tmp_path), datasets, seeds)

    assert len(frame) == 4
    for (variant, dataset), values in written.items():
        row = frame[(frame["row"] == variant) & (frame["dataset"] == dataset)].iloc[0]
        assert row["accuracy_mean"] == pytest.approx(np.mean(values))
        assert row["accuracy_std"] == pytest.approx(np.std(values, ddof=1))
        for seed, value in zip(seeds, values):
            assert row[f"accuracy_seed{seed}"] == pytest.approx(value)
        assert row["mean_class_accuracy_mean"] == pytest.approx(np.mean(values) - 5.0)
        assert row["paper_accuracy"] == paper.TABLE1[variant][dataset]
        assert row["num_seeds"] == 3


def test_single_seed_std_is_blank(tmp_path, datasets):
    fill_runs(tmp_path, [7])
    frame = report.build_table("table1", table1_cells(tmp_path), datasets, [7])
    assert frame["accuracy_std"].isna().all()
    assert "accuracy_seed7" in frame.columns


def test_missing_runs_listed_in_error(tmp_path, datasets):
    fill_runs(tmp_path, [1, 2])
    (tmp_path / "sfew" / "proposed" / "seed2" / "metrics.json").unlink()
    with pytest.raises(report.MissingRunError) as caught:
        report.build_table("table1", table1_cells(tmp_path), datasets, [1, 2])
    message = str(caught.value)
    assert str(tmp_path / "sfew" / "proposed" / "seed2" / "metrics.json") in message
    assert "seed1" not in message


def test_cli_missing_run_exits_1(tmp_path, caplog):
    code = report.main(
        [
            "table", "--kind", "table1", "--out", str(tmp_path / "table1.csv"), "--seeds", "1",
            "--dataset", "rafdb", "rafdb", "RAF-DB",
            "--cell", "baseline", "rafdb", str(tmp_path / "rafdb" / "baseline"),
        ]
    )
    assert code == 1
    assert "metrics.json" in caplog.text
    assert not (tmp_path / "table1.csv").exists()


def test_cli_writes_csv_and_markdown(tmp_path):
    fill_runs(tmp_path, [1, 2])
    out = tmp_path / "out" / "table1.csv"
    args = ["table", "--kind", "table1", "--out", str(out), "--seeds", "1", "2"]
    args += ["--dataset", "rafdb", "rafdb", "RAF-DB", "--dataset", "sfew", "sfew", "SFEW"]
    for cell in table1_cells(tmp_path):
        args += ["--cell", cell.row, cell.dataset, str(cell.run_dir)]
    assert report.main(args) == 0

    frame = pd.read_csv(out)
    assert list(frame["row"]) == ["baseline", "baseline", "proposed", "proposed"]
    assert list(frame["paper_accuracy"]) == [86.93, 52.98, 88.33, 59.86]
    markdown = out.with_suffix(".md").read_text()
    assert "| Baseline |" in markdown
    assert "86.93" in markdown
    assert "±" in markdown
    assert "synthetic" not in markdown.lower()


def test_synthetic_dataset_noted(tmp_path):
    write_metrics(tmp_path / "toy" / "baseline", 1, 0.4, 0.3)
    datasets = [report.DatasetColumn(name="toy", paper_key="rafdb", title="Toy", synthetic=True)]
    cells = [report.Cell(row="baseline", dataset="toy", run_dir=tmp_path / "toy" / "baseline")]
    frame = report.build_table("table1", cells, datasets, [1])
    assert "synthetic" in frame["note"].iloc[0]
    markdown = report.render_markdown("table1", frame, datasets, [1])
    assert markdown.startswith("# Demo on synthetic faces")


def test_table2_published_beside_measured(tmp_path, datasets):
    fill_runs(tmp_path, [1])
    frame = report.build_table("table2", table1_cells(tmp_path), datasets, [1])
    published = frame[frame["source"] != "measured"]
    assert len(published) == 2 * len(paper.TABLE2_PUBLISHED)
    transfer_sfew = published[(published["row"] == "TransFER") & (published["dataset"] == "sfew")]
    assert math.isnan(transfer_sfew["paper_accuracy"].iloc[0])
    fdrl = published[(published["row"] == "FDRL") & (published["dataset"] == "rafdb")]
    assert fdrl["paper_accuracy"].iloc[0] == 89.47
    assert "CVPR 2021" in fdrl["citation"].iloc[0]
    measured = frame[frame["source"] == "measured"]
    assert set(measured["row"]) == {"baseline", "proposed"}


def test_table3_paper_column(tmp_path, datasets):
    write_metrics(tmp_path / "rafdb" / "proposed_l1-0.1", 1, 0.88, 0.8)
    cells = [report.Cell(row="0.1", dataset="rafdb", run_dir=tmp_path / "rafdb" / "proposed_l1-0.1")]
    frame = report.build_table("table3a", cells, datasets, [1])
    assert frame["paper_accuracy"].iloc[0] == 88.07
    assert frame["row_title"].iloc[0] == "lambda1 = 0.1"


def test_figure3_has_no_paper_numbers(tmp_path, datasets):
    for n in (2, 4):
        write_metrics(tmp_path / "rafdb" / f"proposed_n{n}", 1, 0.8 + n / 100, 0.7)
    cells = [
        report.Cell(row=str(n), dataset="rafdb", run_dir=tmp_path / "rafdb" / f"proposed_n{n}") for n in (2, 4)
    ]
    frame = report.build_table("figure3", cells, datasets[:1], [1])
    assert frame["paper_accuracy"].isna().all()
    png = tmp_path / "figure3.png"
    report.plot_figure3(frame, datasets[:1], png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figure4_tsne_panels(tmp_path):
    rng = np.random.default_rng(0)
    panels = []
    for title in ("Baseline", "Proposed"):
        labels = np.repeat(np.arange(7), 4)
        features = rng.normal(size=(28, 16)).astype(np.float32) + labels[:, None]
        path = tmp_path / f"{title}.npz"
        np.savez(path, features=features, labels=labels, predictions=labels)
        panels.append((title, path))
    png = tmp_path / "figure4.png"
    report.plot_figure4(panels, png, seed=0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_paper_key_rejected():
    with pytest.raises(ValueError, match="paper key"):
        report.parse_datasets([["x", "affectnet", "X"]], [])


def test_run_in_wrong_seed_folder_rejected(tmp_path, datasets):
    runs = tmp_path / "runs"
    fill_runs(runs, [1, 2])
    copied = runs / "rafdb" / "baseline" / "seed2" / "metrics.json"
    copied.write_text((runs / "rafdb" / "baseline" / "seed1" / "metrics.json").read_text())
    with pytest.raises(ValueError, match="seed2 was trained with seed 1"):
        report.build_table("table1", table1_cells(runs), datasets, [1, 2])


def test_row_of_other_variant_rejected(tmp_path, datasets):
    runs = tmp_path / "runs"
    fill_runs(runs, [1])
    cells = [report.Cell(row="baseline", dataset="rafdb", run_dir=runs / "rafdb" / "proposed")]
    with pytest.raises(ValueError, match="trained variant"):
        report.build_table("table1", cells, datasets, [1])
