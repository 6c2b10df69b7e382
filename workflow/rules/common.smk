"""Helpers of the slfer workflow: config checks, run ids, input functions, targets.

A run id names one training setting: the variant name for the paper's defaults
(config["training"]), followed by a suffix for each setting that differs from
them, always in this order: ``_l1-{lambda1}``, ``_l2-{lambda2}``, ``_n{top_n}``
(for example ``proposed``, ``proposed_l1-0.1``, ``proposed_n3``). Every table
that needs the same setting therefore asks for the same run folder.
"""

import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

from snakemake.exceptions import WorkflowError


# Auxiliary tasks of each variant; a loss weight or n only matters for a variant
# that trains the task it belongs to (lambda1: segmentation, lambda2 and n: components).
VARIANT_TASKS = {
    "baseline": {"st": False, "ct": False},
    "ct": {"st": False, "ct": True},
    "st": {"st": True, "ct": False},
    "ct_st": {"st": True, "ct": True},
    "proposed": {"st": True, "ct": True},
}

# Titles of the variants in figures.
VARIANT_TITLES = {"baseline": "Baseline", "ct": "CT", "st": "ST", "ct_st": "CT+ST", "proposed": "Proposed"}

TRAINING = config["training"]
DATASETS = config["datasets"]
EXPERIMENTS = config["experiments"]
SEEDS = config["seeds"]

NUMBER_PATTERN = r"[0-9][0-9.e+-]*"
VARIANT_PATTERN = "|".join(sorted(VARIANT_TASKS, key=len, reverse=True))
RUN_PATTERN = rf"({VARIANT_PATTERN})(_l1-{NUMBER_PATTERN})?(_l2-{NUMBER_PATTERN})?(_n[0-9]+)?"
BACKBONE_KEYWORDS = ("imagenet", "none")


def alternation(names):
    """Return a regex matching exactly one of ``names`` (a never-matching one when empty)."""
    if not names:
        return "(?!)"
    return "|".join(re.escape(str(name)) for name in names)


def synth_roots():
    """Return {synth output folder: dataset name} for the generated (demo) datasets."""
    return {
        spec["synth"]["out"].rstrip("/"): name
        for name, spec in DATASETS.items()
        if spec.get("synth")
    }


wildcard_constraints:
    dataset=alternation(DATASETS),
    seed=r"\d+",
    run=RUN_PATTERN,
    part=r"masks|shard\d+-of-\d+",
    synth_root=alternation(synth_roots()),


# ---------------------------------------------------------------- config checks


def check_config():
    """Reject configurations the schema cannot express, naming the key and the fix."""
    problems = []
    for table, experiment in EXPERIMENTS.items():
        names = experiment.get("datasets", [experiment.get("dataset")])
        for name in names:
            if name not in DATASETS:
                problems.append(
                    f"experiments.{table} names dataset {name!r}, which is not under datasets: "
                    f"(configured: {sorted(DATASETS)})"
                )
    for name, spec in DATASETS.items():
        if spec["format"] == "csv" and not spec.get("manifest"):
            problems.append(f"datasets.{name}: format csv needs a manifest: path")
        if config["parser"]["backend"] == "labels" and not spec.get("archive") and not spec.get("labels_root"):
            problems.append(
                f"datasets.{name}: parser backend 'labels' needs labels_root: (the folder of label maps)"
            )
        synth = spec.get("synth")
        if synth:
            out = Path(synth["out"])
            if out not in Path(spec["root"]).parents:
                problems.append(f"datasets.{name}: root {spec['root']!r} must lie inside synth.out {str(out)!r}")
    if TRAINING["crop_size"] > TRAINING["image_size"]:
        problems.append(
            f"training.crop_size ({TRAINING['crop_size']}) is larger than training.image_size "
            f"({TRAINING['image_size']})"
        )
    if problems:
        raise WorkflowError("Invalid configuration:\n  " + "\n  ".join(problems))


check_config()


# ---------------------------------------------------------------- run ids


def format_number(value):
    """Format a setting for a run id: shortest general form (0.001, 0.1, 1, 1e-05)."""
    return f"{float(value):g}"


def run_id(variant, lambda1=None, lambda2=None, top_n=None):
    """Return the canonical run id of a setting; None means the training default."""
    if variant not in VARIANT_TASKS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANT_TASKS)}")
    tasks = VARIANT_TASKS[variant]
    name = variant
    if lambda1 is not None and float(lambda1) != float(TRAINING["lambda1"]):
        if not tasks["st"]:
            raise ValueError(f"variant {variant!r} has no segmentation task, so lambda1 cannot vary")
        name += f"_l1-{format_number(lambda1)}"
    if lambda2 is not None and float(lambda2) != float(TRAINING["lambda2"]):
        if not tasks["ct"]:
            raise ValueError(f"variant {variant!r} has no component task, so lambda2 cannot vary")
        name += f"_l2-{format_number(lambda2)}"
    if top_n is not None and int(top_n) != int(TRAINING["top_n"]):
        if not tasks["ct"]:
            raise ValueError(f"variant {variant!r} has no component task, so n cannot vary")
        name += f"_n{int(top_n)}"
    return name


def parse_run_id(run):
    """Return the settings {variant, lambda1, lambda2, top_n} of a canonical run id."""
    match = re.fullmatch(RUN_PATTERN, run)
    if not match:
        raise WorkflowError(f"invalid run id {run!r}; expected VARIANT[_l1-X][_l2-Y][_nN]")
    variant, lambda1, lambda2, top_n = match.groups()
    settings = {
        "variant": variant,
        "lambda1": float(lambda1[4:]) if lambda1 else float(TRAINING["lambda1"]),
        "lambda2": float(lambda2[4:]) if lambda2 else float(TRAINING["lambda2"]),
        "top_n": int(top_n[2:]) if top_n else int(TRAINING["top_n"]),
    }
    try:
        canonical = run_id(**settings)
    except ValueError as error:
        raise WorkflowError(f"invalid run id {run!r}: {error}") from error
    if canonical != run:
        raise WorkflowError(
            f"run id {run!r} is not canonical: the same setting is named {canonical!r} "
            "(default settings carry no suffix, suffixes come in the order _l1, _l2, _n)"
        )
    return settings


def run_dir(dataset, run):
    """Return the folder holding one seed*/ folder per seed of a run."""
    return f"results/runs/{dataset}/{run}"


def metrics_path(dataset, run, seed):
    return f"{run_dir(dataset, run)}/seed{seed}/metrics.json"


# ---------------------------------------------------------------- experiments


def experiment_cells(table):
    """Return the (row key, dataset, run id) cells of a table, in display order."""
    cells = []
    if table in ("table1", "table2"):
        experiment = EXPERIMENTS[table]
        for variant in experiment["variants"]:
            for dataset in experiment["datasets"]:
                cells.append((variant, dataset, run_id(variant)))
    elif table in ("table3a", "table3b"):
        experiment = EXPERIMENTS["table3"]
        key = "lambda1" if table == "table3a" else "lambda2"
        for value in experiment[key]:
            for dataset in experiment["datasets"]:
                cells.append((format_number(value), dataset, run_id(experiment["variant"], **{key: value})))
    elif table == "figure3":
        experiment = EXPERIMENTS["figure3"]
        for top_n in experiment["top_n"]:
            for dataset in experiment["datasets"]:
                cells.append((str(top_n), dataset, run_id(experiment["variant"], top_n=top_n)))
    else:
        raise ValueError(f"unknown table {table!r}")
    return cells


def table_datasets(table):
    experiment = EXPERIMENTS["table3" if table.startswith("table3") else table]
    return experiment["datasets"]


def table_metrics(table):
    """Return every seed's metrics.json of a table's cells."""
    return [
        metrics_path(dataset, run, seed)
        for _, dataset, run in experiment_cells(table)
        for seed in SEEDS
    ]


def get_table_metrics(wildcards):
    return table_metrics(wildcards.table)


def get_figure3_metrics(wildcards):
    return table_metrics("figure3")


def get_report_args(table):
    """Return the slfer-report arguments naming a table's datasets, seeds and cells."""
    args = ["--seeds", *map(str, SEEDS)]
    for name in table_datasets(table):
        spec = DATASETS[name]
        args += ["--dataset", name, spec.get("paper") or "-", spec["title"]]
        if spec.get("synth"):
            args += ["--synthetic", name]
    for row, dataset, run in experiment_cells(table):
        args += ["--cell", row, dataset, run_dir(dataset, run)]
    return " ".join(shlex.quote(arg) for arg in args)


def get_table_report_args(wildcards):
    return get_report_args(wildcards.table)


def get_figure3_report_args(wildcards):
    return get_report_args("figure3")


def get_figure4_features(wildcards):
    experiment = EXPERIMENTS["figure4"]
    return [
        f"{run_dir(experiment['dataset'], run_id(variant))}/seed{experiment['seed']}/features.npz"
        for variant in experiment["variants"]
    ]


def get_figure4_panels(wildcards):
    """Return the --panel arguments of Figure 4, one per variant, left to right."""
    experiment = EXPERIMENTS["figure4"]
    args = []
    for variant, path in zip(experiment["variants"], get_figure4_features(wildcards)):
        args += ["--panel", f"{VARIANT_TITLES[variant]}, {DATASETS[experiment['dataset']]['title']}", path]
    if DATASETS[experiment["dataset"]].get("synth"):
        args += ["--note", "synthetic faces: not comparable to the paper"]
    return " ".join(shlex.quote(arg) for arg in args)


def all_targets():
    """Return every table and figure of the paper."""
    tables = ["table1", "table2", "table3a", "table3b"]
    return (
        [f"results/{table}.{suffix}" for table in tables for suffix in ("csv", "md")]
        + ["results/figure3.csv", "results/figure3.md", "results/figure3.png"]
        + ["results/figure4.png", "results/figure5.png"]
    )


# ---------------------------------------------------------------- datasets and archives


def get_dataset_input(wildcards):
    """Return what the image cache is built from: the synth manifest or the dataset root."""
    spec = DATASETS[wildcards.dataset]
    if spec.get("synth"):
        return f"{spec['synth']['out'].rstrip('/')}/manifest.json"
    if not Path(spec["root"]).is_dir():
        raise WorkflowError(
            f"The dataset folder {spec['root']} (datasets.{wildcards.dataset}.root) was not found. "
            f"Put the {spec['title']} files there (layout: format {spec['format']}, see README.md) "
            f"or point datasets.{wildcards.dataset}.root at them."
        )
    return spec["root"]


def get_cache_args(wildcards):
    spec = DATASETS[wildcards.dataset]
    args = ["--format", spec["format"], "--root", spec["root"], "--name", wildcards.dataset]
    if spec.get("manifest"):
        args += ["--manifest", spec["manifest"]]
    args += ["--size", str(TRAINING["image_size"]), "--on-bad", spec.get("on_bad", "error")]
    return " ".join(shlex.quote(arg) for arg in args)


def get_synth_args(wildcards):
    spec = DATASETS[synth_roots()[wildcards.synth_root]]["synth"]
    args = ["--seed", str(spec["seed"])]
    for key in ("size", "train_per_class", "test_per_class", "label_noise", "difficulty"):
        if key in spec:
            option = key.replace("_", "-")
            args += [f"--{option}", str(spec[key])]
    return " ".join(shlex.quote(arg) for arg in args)


def archive_path(dataset):
    """Return the mask archive a dataset's runs read: imported, parsed or merged from shards."""
    if DATASETS[dataset].get("archive"):
        return f"results/data/{dataset}/imported/masks.h5"
    shards = config["parser"]["shards"]
    if shards == 1:
        return f"results/data/{dataset}/parsed/masks.h5"
    return f"results/data/{dataset}/merged/masks.h5"


def get_archive(wildcards):
    return archive_path(wildcards.dataset)


def get_figure5_archive(wildcards):
    return archive_path(EXPERIMENTS["figure5"]["dataset"])


def get_figure5_cache(wildcards):
    return f"results/data/{EXPERIMENTS['figure5']['dataset']}/images.h5"


def get_shards(wildcards):
    shards = config["parser"]["shards"]
    return [f"results/data/{wildcards.dataset}/parsed/shard{index}-of-{shards}.h5" for index in range(shards)]


def get_shared_archive(wildcards):
    """Return the configured shared archive; a URL goes through a Snakemake storage plugin."""
    location = DATASETS[wildcards.dataset].get("archive")
    if not location:
        raise WorkflowError(f"datasets.{wildcards.dataset} has no archive: key")
    if "://" in location and urlsplit(location).scheme:
        # NOTE: needs the storage plugin for the URL's scheme installed
        # (snakemake-storage-plugin-http for http/https); not exercised by the tests.
        return storage(location)
    return location


def get_parser_weights(wildcards):
    if config["parser"]["backend"] == "bisenet":
        return config["parser"]["weights"]
    return []


def get_parse_args(wildcards):
    """Return the slfer-parse parse arguments of one archive or shard."""
    parser = config["parser"]
    args = ["--backend", parser["backend"]]
    if parser["backend"] == "bisenet":
        args += [
            "--weights", parser["weights"],
            "--input-size", str(parser["input_size"]),
            "--batch-size", str(parser["batch_size"]),
        ]
    else:
        args += ["--labels-root", DATASETS[wildcards.dataset]["labels_root"]]
    args += ["--merge", ",".join(map(str, parser["merge_19_to_8"])), "--top-n", str(parser["top_n"])]
    match = re.fullmatch(r"shard(\d+)-of-(\d+)", wildcards.part)
    if match:
        args += ["--shard", f"{match.group(1)}/{match.group(2)}"]
    return " ".join(shlex.quote(arg) for arg in args)


def get_parse_gpus(wildcards):
    return 1 if config["parser"]["backend"] == "bisenet" else 0


# ---------------------------------------------------------------- training


def get_backbone_weights(wildcards):
    """Return the backbone checkpoint as an input, or stop the workflow when it is missing."""
    source = TRAINING["backbone_weights"]
    if source in BACKBONE_KEYWORDS:
        return []
    if not Path(source).is_file():
        raise WorkflowError(
            f"The backbone checkpoint {source} (training.backbone_weights) was not found.\n"
            "The paper's ResNet-18 is pretrained on MS-Celeb-1M, and that file cannot be downloaded "
            "automatically. Get one of:\n"
            "  - resnet18_msceleb.pth, linked from the README of the DAN repository "
            "(github.com/yaoing/DAN), or\n"
            "  - ijba_res18_naive.pth.tar, linked from the READMEs of RAN and SCN "
            "(github.com/kaiwang960112/Self-Cure-Network),\n"
            f"and put it at {source} (or point training.backbone_weights at it).\n"
            "To run without it, set training.backbone_weights to imagenet (torchvision weights) or none "
            "(random initialisation); the results are then not comparable to the paper's."
        )
    return source


def get_train_archive(wildcards):
    """Return the mask archive of a run, or nothing for baseline, which trains without masks."""
    if parse_run_id(wildcards.run)["variant"] == "baseline":
        return []
    return archive_path(wildcards.dataset)


def get_train_archive_args(wildcards, input):
    if not input.archive:
        return ""
    return f"--archive {shlex.quote(str(input.archive))}"


def get_train_args(wildcards):
    """Return the slfer train arguments of one run (settings from the run id and config)."""
    settings = parse_run_id(wildcards.run)
    args = [
        "--variant", settings["variant"],
        "--seed", wildcards.seed,
        "--lambda1", format_number(settings["lambda1"]),
        "--lambda2", format_number(settings["lambda2"]),
        "--top-n", str(settings["top_n"]),
        "--ct-labels", TRAINING["ct_labels"],
        "--backbone-weights", TRAINING["backbone_weights"],
        "--epochs", str(TRAINING["epochs"]),
        "--batch-size", str(TRAINING["batch_size"]),
        "--lr", format_number(TRAINING["lr"]),
        "--betas", *map(format_number, TRAINING["betas"]),
        "--milestones", *map(str, TRAINING["milestones"]),
        "--gamma", format_number(TRAINING["gamma"]),
        "--crop-size", str(TRAINING["crop_size"]),
    ]
    return " ".join(shlex.quote(arg) for arg in args)


def get_train_mem_mb(wildcards, input, attempt):
    """Estimate training memory: the cache and archive are loaded into RAM, plus the model."""
    loaded_mb = input.size_mb  # sum over the rule's inputs: cache + archive (+ backbone)
    return int(2 * loaded_mb + 4000 * attempt)
