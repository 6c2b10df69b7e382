"""Build the paper's tables (CSV + Markdown) and Figures 3 and 4 from finished run folders.

A run folder is ``RUNS/{dataset}/{run}`` with one ``seed{S}/metrics.json`` per
seed, as ``slfer train`` writes it. Every table reports, per cell, the mean and
sample standard deviation (ddof=1, blank for a single seed) of the final-epoch
test accuracy over seeds, each seed's value, the same for mean class accuracy,
and the paper's number beside it. Accuracies are in percent.

Console script ``slfer-report``::

    slfer-report table --kind table1 --out results/table1.csv --seeds 1 2 3 \\
        --dataset rafdb rafdb RAF-DB --dataset sfew sfew SFEW \\
        --cell baseline rafdb results/runs/rafdb/baseline ...
    slfer-report figure3 --out results/figure3.csv --figure results/figure3.png ...
    slfer-report figure4 --out results/figure4.png \\
        --panel Baseline results/runs/rafdb/baseline/seed1/features.npz \\
        --panel Proposed results/runs/rafdb/proposed/seed1/features.npz
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from parsing.labels import EXPRESSIONS
from slfer import paper
from slfer.atomic import atomic_output

logger = logging.getLogger(__name__)

TABLE_KINDS: tuple[str, ...] = ("table1", "table2", "table3a", "table3b", "figure3")

TABLE_TITLES: dict[str, str] = {
    "table1": "Table 1: auxiliary tasks (test accuracy %)",
    "table2": "Table 2: comparison with published methods (test accuracy %)",
    "table3a": "Table 3a: weight lambda1 of the segmentation loss, lambda2 = 0.5 (Proposed, test accuracy %)",
    "table3b": "Table 3b: weight lambda2 of the component loss, lambda1 = 0.5 (Proposed, test accuracy %)",
    "figure3": "Figure 3: number n of dominant components in the component task (Proposed, test accuracy %)",
}

SYNTHETIC_NOTE = (
    "synthetic faces from slfer-parse synth; these numbers say nothing about RAF-DB or SFEW "
    "and are not comparable to the paper's"
)


class MissingRunError(FileNotFoundError):
    """Raised when a table needs run results that do not exist."""


@dataclass(frozen=True)
class DatasetColumn:
    """A dataset as the tables show it."""

    name: str  # configured dataset name, the folder under the runs root
    paper_key: str | None  # key of slfer.paper.PAPER_DATASETS, None when the paper has no column
    title: str
    synthetic: bool = False


@dataclass(frozen=True)
class Cell:
    """One measured cell: a table row on one dataset, backed by one run folder."""

    row: str
    dataset: str
    run_dir: Path


def load_seed_metrics(run_dir: Path, seeds: Sequence[int]) -> list[dict]:
    """Read ``run_dir/seed{S}/metrics.json`` for every seed, in the order given."""
    paths = [Path(run_dir) / f"seed{seed}" / "metrics.json" for seed in seeds]
    missing = [path for path in paths if not path.is_file()]
    if missing:
        listing = "\n  ".join(str(path) for path in missing)
        raise MissingRunError(
            f"{len(missing)} run result(s) needed for this table are missing:\n  {listing}\n"
            "Run the workflow for these paths first (for example `snakemake --cores all PATH`)."
        )
    metrics = []
    for seed, path in zip(seeds, paths):
        with path.open() as handle:
            data = json.load(handle)
        for key in ("accuracy", "mean_class_accuracy"):
            if key not in data:
                raise ValueError(f"{path}: metrics.json has no {key!r} entry; rerun that training job")
        # A run copied into the wrong seed folder would otherwise count twice.
        if "seed" in data and int(data["seed"]) != seed:
            raise ValueError(
                f"{path}: the run in folder seed{seed} was trained with seed {data['seed']}; "
                "put each run in the folder of its own seed"
            )
        metrics.append(data)
    return metrics


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Return the mean and the sample standard deviation (ddof=1; NaN for one value)."""
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return float(array.mean()), std


def row_title(kind: str, row: str) -> str:
    """Return the row label the SLFER paper uses for a row key of table ``kind``."""
    if kind in ("table1", "table2"):
        return paper.VARIANT_TITLES.get(row, row)
    if kind == "table3a":
        return f"lambda1 = {row}"
    if kind == "table3b":
        return f"lambda2 = {row}"
    if kind == "figure3":
        return f"n = {row}"
    raise ValueError(f"unknown table kind {kind!r}; expected one of {TABLE_KINDS}")


def measured_rows(
    kind: str, cells: Sequence[Cell], datasets: Sequence[DatasetColumn], seeds: Sequence[int]
) -> list[dict]:
    """Return one long-format record per cell with its per-seed values and summaries."""
    by_name = {dataset.name: dataset for dataset in datasets}
    missing_errors = []
    records = []
    for cell in cells:
        if cell.dataset not in by_name:
            raise ValueError(f"cell {cell.row!r} names dataset {cell.dataset!r}, which has no --dataset entry")
        dataset = by_name[cell.dataset]
        try:
            metrics = load_seed_metrics(cell.run_dir, seeds)
        except MissingRunError as error:
            missing_errors.append(str(error))
            continue
        if kind in ("table1", "table2"):
            # Rows of tables 1 and 2 are variant names: the runs must be of that variant.
            trained = sorted({entry.get("variant", cell.row) for entry in metrics})
            if trained != [cell.row]:
                raise ValueError(
                    f"row {cell.row!r} of {kind} points at {cell.run_dir}, whose runs trained variant(s) "
                    f"{', '.join(trained)}; give the run folder of the {cell.row!r} variant"
                )
        record = {
            "table": kind,
            "row": cell.row,
            "row_title": row_title(kind, cell.row),
            "dataset": dataset.name,
            "dataset_title": dataset.title,
            "run": cell.run_dir.name,
            "source": "measured",
            "num_seeds": len(seeds),
        }
        for key in ("accuracy", "mean_class_accuracy"):
            values = [100.0 * float(entry[key]) for entry in metrics]
            record[f"{key}_mean"], record[f"{key}_std"] = mean_and_std(values)
            for seed, value in zip(seeds, values):
                record[f"{key}_seed{seed}"] = value
        record["num_test_images"] = metrics[0].get("num_test_images")
        record["paper_accuracy"] = paper.paper_accuracy(kind, cell.row, dataset.paper_key)
        record["citation"] = paper.SLFER_CITATION if record["paper_accuracy"] is not None else ""
        record["note"] = SYNTHETIC_NOTE if dataset.synthetic else ""
        records.append(record)
    if missing_errors:
        raise MissingRunError("\n".join(missing_errors))
    return records


def published_rows(datasets: Sequence[DatasetColumn]) -> list[dict]:
    """Return Table 2's published-method records for the datasets the paper reports."""
    records = []
    for method in paper.TABLE2_PUBLISHED:
        for dataset in datasets:
            if dataset.paper_key is None:
                continue
            records.append(
                {
                    "table": "table2",
                    "row": method.name,
                    "row_title": method.name,
                    "dataset": dataset.name,
                    "dataset_title": dataset.title,
                    "source": "published, as quoted in the SLFER paper",
                    "paper_accuracy": method.accuracy.get(dataset.paper_key),
                    "citation": method.citation,
                    "note": "",
                }
            )
    return records


def build_table(
    kind: str, cells: Sequence[Cell], datasets: Sequence[DatasetColumn], seeds: Sequence[int]
) -> pd.DataFrame:
    """Build the long-format table: one row per (table row, dataset)."""
    if kind not in TABLE_KINDS:
        raise ValueError(f"unknown table kind {kind!r}; expected one of {TABLE_KINDS}")
    if not seeds:
        raise ValueError("no seeds given; pass --seeds with at least one seed")
    records = measured_rows(kind, cells, datasets, seeds)
    if kind == "table2":
        records = published_rows(datasets) + records
    frame = pd.DataFrame.from_records(records)
    seed_columns = [f"{key}_seed{seed}" for key in ("accuracy", "mean_class_accuracy") for seed in seeds]
    columns = [
        "table", "row", "row_title", "dataset", "dataset_title", "run", "source", "num_seeds",
        "accuracy_mean", "accuracy_std", *seed_columns[: len(seeds)],
        "mean_class_accuracy_mean", "mean_class_accuracy_std", *seed_columns[len(seeds):],
        "num_test_images", "paper_accuracy", "citation", "note",
    ]
    return frame.reindex(columns=columns)


def format_percent(value: object) -> str:
    """Format a percentage with two decimals, or "-" when absent."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):.2f}"


def format_mean_std(mean: object, std: object) -> str:
    """Format "mean ± std", or the mean alone when std is undefined (one seed)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return format_percent(mean)
    return f"{float(mean):.2f} ± {float(std):.2f}"


def render_markdown(kind: str, frame: pd.DataFrame, datasets: Sequence[DatasetColumn], seeds: Sequence[int]) -> str:
    """Render the table as Markdown: one line per row, three columns per dataset."""
    lines = []
    if any(dataset.synthetic for dataset in datasets):
        lines += ["# Demo on synthetic faces: not comparable to the paper", ""]
        lines += [f"Every measured number below is about {SYNTHETIC_NOTE}.", ""]
    lines += [f"## {TABLE_TITLES[kind]}", ""]
    seed_list = ", ".join(str(seed) for seed in seeds)
    lines += [
        f"Measured: final-epoch test accuracy, mean ± sample standard deviation over seeds {seed_list}; "
        "MCA: mean class accuracy; Paper: the number the SLFER paper reports for the same cell.",
        "",
    ]
    header = ["Method" if kind in ("table1", "table2") else "Setting"]
    for dataset in datasets:
        header += [f"{dataset.title} measured", f"{dataset.title} MCA", f"{dataset.title} paper"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    row_keys = list(dict.fromkeys(frame["row"]))
    for row in row_keys:
        rows = frame[frame["row"] == row]
        title = rows["row_title"].iloc[0]
        if kind == "table2" and rows["source"].iloc[0] == "measured":
            title = f"{title} (this project)"
        cells = [str(title)]
        for dataset in datasets:
            match = rows[rows["dataset"] == dataset.name]
            if match.empty:
                cells += ["-", "-", "-"]
                continue
            entry = match.iloc[0]
            cells.append(format_mean_std(entry["accuracy_mean"], entry["accuracy_std"]))
            cells.append(format_mean_std(entry["mean_class_accuracy_mean"], entry["mean_class_accuracy_std"]))
            cells.append(format_percent(entry["paper_accuracy"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if kind == "figure3":
        lines += [f"The paper prints no numbers for Figure 3; it reports n = {paper.FIGURE3_BEST_N} as best.", ""]
    if kind == "table2":
        lines += ["Published methods:", ""]
        for method in paper.TABLE2_PUBLISHED:
            lines.append(f"- {method.name}: {method.citation}")
        lines.append("")
    lines += [f"Paper: {paper.SLFER_CITATION}.", ""]
    return "\n".join(lines)


def write_table(
    kind: str, frame: pd.DataFrame, datasets: Sequence[DatasetColumn], seeds: Sequence[int], csv_path: Path
) -> Path:
    """Write the table as CSV at ``csv_path`` and as Markdown beside it (same stem, ``.md``)."""
    csv_path = Path(csv_path)
    markdown_path = csv_path.with_suffix(".md")
    with atomic_output(csv_path) as temporary:
        frame.to_csv(temporary, index=False, float_format="%.4f")
    with atomic_output(markdown_path) as temporary:
        temporary.write_text(render_markdown(kind, frame, datasets, seeds), encoding="utf-8")
    logger.info("wrote %s and %s", csv_path, markdown_path)
    return markdown_path


def plot_figure3(frame: pd.DataFrame, datasets: Sequence[DatasetColumn], png_path: Path) -> None:
    """Plot accuracy against n with one line per dataset and the seed spread as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.0, 3.6))
    for dataset in datasets:
        rows = frame[frame["dataset"] == dataset.name].copy()
        rows["n"] = rows["row"].astype(int)
        rows = rows.sort_values("n")
        errors = rows["accuracy_std"].fillna(0.0)
        axis.errorbar(rows["n"], rows["accuracy_mean"], yerr=errors, marker="o", capsize=3, label=dataset.title)
    axis.axvline(paper.FIGURE3_BEST_N, color="grey", linestyle="--", linewidth=1, label="best n in the paper")
    axis.set_xlabel("n (dominant components marked positive)")
    axis.set_ylabel("test accuracy (%)")
    title = "Accuracy against n (Proposed)"
    if any(dataset.synthetic for dataset in datasets):
        title += "\nsynthetic faces: not comparable to the paper"
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    with atomic_output(Path(png_path)) as temporary:
        figure.savefig(temporary, dpi=150, format="png")
    plt.close(figure)


def embed_tsne(features: np.ndarray, seed: int) -> np.ndarray:
    """Return a 2-D t-SNE embedding [N, 2] of ``features`` [N, D]."""
    from sklearn.manifold import TSNE

    count = features.shape[0]
    if count < 5:
        raise ValueError(f"t-SNE needs at least 5 feature vectors, got {count}")
    # scikit-learn requires perplexity < number of samples.
    perplexity = float(min(30.0, (count - 1) / 3.0))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(features.astype(np.float64))


def plot_figure4(panels: Sequence[tuple[str, Path]], png_path: Path, seed: int = 0, note: str = "") -> None:
    """Plot one t-SNE panel per features.npz, coloured by the true expression."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("figure4 needs at least one --panel")
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4), squeeze=False)
    colours = plt.get_cmap("tab10")
    for axis, (title, path) in zip(axes[0], panels):
        path = Path(path)
        if not path.is_file():
            raise MissingRunError(f"features file {path} is missing; run the training job that writes it first")
        with np.load(path, allow_pickle=False) as data:
            features = data["features"]  # float32 [N, D]
            labels = data["labels"]  # int [N], canonical expression ids
        embedding = embed_tsne(features, seed)
        for class_id, name in enumerate(EXPRESSIONS):
            selected = labels == class_id
            axis.scatter(embedding[selected, 0], embedding[selected, 1], s=4, color=colours(class_id), label=name)
        axis.set_title(f"{title} ({features.shape[0]} test images)", fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
    axes[0][-1].legend(markerscale=3, fontsize=8, loc="best")
    if note:
        figure.suptitle(note, fontsize=9)
    figure.tight_layout()
    with atomic_output(Path(png_path)) as temporary:
        figure.savefig(temporary, dpi=150, format="png")
    plt.close(figure)


def parse_datasets(entries: Sequence[Sequence[str]], synthetic: Sequence[str]) -> list[DatasetColumn]:
    """Turn ``--dataset NAME PAPER_KEY TITLE`` entries into columns (PAPER_KEY "-" for none)."""
    datasets = []
    for name, paper_key, title in entries:
        key = None if paper_key == "-" else paper_key
        if key is not None and key not in paper.PAPER_DATASETS:
            raise ValueError(
                f"--dataset {name}: paper key {paper_key!r} is unknown; use one of {paper.PAPER_DATASETS} or '-'"
            )
        datasets.append(DatasetColumn(name=name, paper_key=key, title=title, synthetic=name in synthetic))
    unknown = sorted(set(synthetic) - {dataset.name for dataset in datasets})
    if unknown:
        raise ValueError(f"--synthetic names datasets without a --dataset entry: {unknown}")
    return datasets


def add_table_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments shared by ``table`` and ``figure3``."""
    parser.add_argument("--out", type=Path, required=True, help="CSV path; the Markdown table goes beside it (.md)")
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="seeds every cell must have")
    parser.add_argument(
        "--dataset", nargs=3, action="append", required=True, metavar=("NAME", "PAPER_KEY", "TITLE"),
        help="a dataset column: its runs folder name, the paper's dataset key (rafdb, sfew or -) and its title",
    )
    parser.add_argument(
        "--synthetic", action="append", default=[], metavar="NAME",
        help="mark a dataset as synthetic: its rows carry a note and the Markdown says so",
    )
    parser.add_argument(
        "--cell", nargs=3, action="append", required=True, metavar=("ROW", "DATASET", "RUN_DIR"),
        help="a measured cell: row key (variant or varied value), dataset name, run folder holding seed*/",
    )


def build_parser() -> argparse.ArgumentParser:
    """Build the ``slfer-report`` argument parser."""
    parser = argparse.ArgumentParser(prog="slfer-report", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    table = commands.add_parser("table", help="write a table as CSV and Markdown")
    table.add_argument("--kind", choices=[kind for kind in TABLE_KINDS if kind != "figure3"], required=True)
    add_table_arguments(table)

    figure3 = commands.add_parser("figure3", help="write Figure 3 (accuracy against n) as CSV, Markdown and PNG")
    add_table_arguments(figure3)
    figure3.add_argument("--figure", type=Path, required=True, help="PNG path of the plot")

    figure4 = commands.add_parser("figure4", help="write Figure 4 (t-SNE of test features) as PNG")
    figure4.add_argument("--out", type=Path, required=True, help="PNG path")
    figure4.add_argument(
        "--panel", nargs=2, action="append", required=True, metavar=("TITLE", "FEATURES_NPZ"),
        help="one panel: its title and the features.npz a training run wrote",
    )
    figure4.add_argument("--tsne-seed", type=int, default=0, help="random state of t-SNE")
    figure4.add_argument("--note", default="", help="line printed above the panels")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``slfer-report``; return the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "figure4":
            plot_figure4([(title, Path(path)) for title, path in args.panel], args.out, args.tsne_seed, args.note)
            return 0
        datasets = parse_datasets(args.dataset, args.synthetic)
        cells = [Cell(row=row, dataset=dataset, run_dir=Path(run_dir)) for row, dataset, run_dir in args.cell]
        kind = "figure3" if args.command == "figure3" else args.kind
        frame = build_table(kind, cells, datasets, args.seeds)
        write_table(kind, frame, datasets, args.seeds, args.out)
        if args.command == "figure3":
            plot_figure3(frame, datasets, args.figure)
    except (MissingRunError, ValueError) as error:
        logger.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
