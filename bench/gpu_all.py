"""Run every benchmark on a CUDA GPU and estimate the wall time of the full paper reproduction.

Measures in one process the bf16 matmul rate, the parse stage (project
against the demo-style loop, both on the GPU) and the training data path
(both loaders delivering batches to the GPU). It also times training steps of
every variant that the configuration trains, in bf16 autocast with
channels_last as the trainer uses on CUDA, and the test-time forward.

From those rates it estimates the time of the whole reproduction. That covers
every run of Table 1, Table 2, Table 3 and Figure 3 over the configured seeds,
each with ``epochs`` passes over the training split and one test pass per
epoch, and one parse of every image. The estimate is serial time on one GPU
for the measured steps alone. It leaves out process start, loading the cache
into RAM, checkpoints and the report. Several runs sharing one GPU, or
several GPUs, shorten it. The test pass uses Baseline's measured forward rate
for every variant.

    python3 bench/gpu_all.py --dry-run           # print the plan; needs no GPU
    python3 bench/gpu_all.py                      # measure on cuda and estimate
    python3 bench/gpu_all.py --device cpu --quick # exercise the code on a CPU
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, add_common_arguments, apply_threads, print_machine, print_result, write_json  # noqa: E402

# Split sizes of the public releases: RAF-DB basic (EmoLabel/list_patition_label.txt) and the
# SFEW 2.0 aligned faces. The SLFER paper counts 958 / 436 SFEW frames, but the aligned-face
# release has about 891 / 431 because its face detector missed some frames.
SPLIT_IMAGES = {
    "rafdb": {"train": 12271, "test": 3068},
    "sfew": {"train": 891, "test": 431},
}

# Used when no configuration file is found: the experiments of config.yaml as first written.
ASSUMED_CONFIG = {
    "training": {"epochs": 40, "batch_size": 16, "crop_size": 224, "lambda1": 0.5, "lambda2": 0.5, "top_n": 4},
    "seeds": [1, 2, 3],
    "datasets": {"rafdb": {"paper": "rafdb"}, "sfew": {"paper": "sfew"}},
    "experiments": {
        "table1": {"variants": ["baseline", "ct", "st", "ct_st", "proposed"], "datasets": ["rafdb", "sfew"]},
        "table2": {"variants": ["baseline", "proposed"], "datasets": ["rafdb", "sfew"]},
        "table3": {
            "variant": "proposed",
            "lambda1": [0, 0.001, 0.1, 0.5, 1],
            "lambda2": [0, 0.001, 0.1, 0.5, 1],
            "datasets": ["rafdb", "sfew"],
        },
        "figure3": {"variant": "proposed", "top_n": [1, 2, 3, 4, 5, 6, 7, 8], "datasets": ["rafdb", "sfew"]},
    },
}


@dataclass(frozen=True)
class Run:
    """One training run; equal settings in two tables are one run, as the workflow trains them once."""

    dataset: str
    variant: str
    lambda1: float
    lambda2: float
    top_n: int
    seed: int


@dataclass
class Plan:
    runs: list[Run]
    epochs: int
    batch_size: int
    crop_size: int
    split_images: dict[str, dict[str, int]]  # dataset -> {"train", "test"} image counts
    source: str

    def variants(self) -> list[str]:
        return sorted({run.variant for run in self.runs}, key=["baseline", "ct", "st", "ct_st", "proposed"].index)


def load_config(path: Path | None) -> tuple[dict, str]:
    """Read the workflow configuration, or return the assumed one when ``path`` does not exist."""
    if path is not None and path.exists():
        with open(path) as stream:
            return yaml.safe_load(stream), str(path)
    return ASSUMED_CONFIG, "assumed (no configuration file found; the counts of config.yaml as first written)"


def build_plan(config: dict, source: str) -> Plan:
    """List the distinct training runs of Tables 1-3 and Figure 3 over the configured seeds."""
    training = config["training"]
    defaults = (float(training["lambda1"]), float(training["lambda2"]), int(training["top_n"]))
    experiments = config["experiments"]
    cells: set[tuple[str, str, float, float, int]] = set()
    for table in ("table1", "table2"):
        for dataset in experiments.get(table, {}).get("datasets", []):
            for variant in experiments[table]["variants"]:
                cells.add((dataset, variant, *defaults))
    table3 = experiments.get("table3")
    if table3:
        for dataset in table3["datasets"]:
            for value in table3["lambda1"]:
                cells.add((dataset, table3["variant"], float(value), defaults[1], defaults[2]))
            for value in table3["lambda2"]:
                cells.add((dataset, table3["variant"], defaults[0], float(value), defaults[2]))
    figure3 = experiments.get("figure3")
    if figure3:
        for dataset in figure3["datasets"]:
            for value in figure3["top_n"]:
                cells.add((dataset, figure3["variant"], defaults[0], defaults[1], int(value)))

    split_images = {}
    for dataset in sorted({cell[0] for cell in cells}):
        paper_name = config["datasets"].get(dataset, {}).get("paper")
        if paper_name not in SPLIT_IMAGES:
            raise ValueError(
                f"dataset {dataset!r} of {source} has paper: {paper_name!r}; this estimate knows the split sizes "
                f"of {sorted(SPLIT_IMAGES)} only"
            )
        split_images[dataset] = SPLIT_IMAGES[paper_name]
    runs = [Run(*cell, seed=int(seed)) for cell in sorted(cells) for seed in config["seeds"]]
    return Plan(
        runs=runs,
        epochs=int(training["epochs"]),
        batch_size=int(training["batch_size"]),
        crop_size=int(training["crop_size"]),
        split_images=split_images,
        source=source,
    )


def print_plan(plan: Plan) -> None:
    print(f"plan source: {plan.source}")
    print(f"plan: {len(plan.runs)} training runs, {plan.epochs} epochs each, batch {plan.batch_size}, "
          f"crop {plan.crop_size}")
    for dataset, counts in plan.split_images.items():
        dataset_runs = [run for run in plan.runs if run.dataset == dataset]
        per_variant = {variant: sum(run.variant == variant for run in dataset_runs) for variant in plan.variants()}
        train_images = trained_images_per_epoch(counts["train"], plan.batch_size)
        print(f"plan {dataset}: {counts['train']} train / {counts['test']} test images; {len(dataset_runs)} runs "
              f"({', '.join(f'{v} {n}' for v, n in per_variant.items())}); "
              f"{train_images * plan.epochs * len(dataset_runs):,} training images in all")


def trained_images_per_epoch(train_images: int, batch_size: int) -> int:
    """Images one epoch trains on: the trainer drops the last incomplete batch."""
    return (train_images // batch_size) * batch_size


def estimate(
    plan: Plan, train_rates: dict[str, float], eval_rate: float, parse_rate: float, device: str = "cuda"
) -> dict:
    """Estimate the serial seconds of the plan on ``device`` from measured images/s; print and return the parts."""
    training_seconds = 0.0
    test_seconds = 0.0
    for run in plan.runs:
        counts = plan.split_images[run.dataset]
        training_seconds += plan.epochs * trained_images_per_epoch(counts["train"], plan.batch_size) / train_rates[run.variant]
        test_seconds += plan.epochs * counts["test"] / eval_rate
    parse_images = sum(counts["train"] + counts["test"] for counts in plan.split_images.values())
    parse_seconds = parse_images / parse_rate
    total = training_seconds + test_seconds + parse_seconds
    unit = f"hours on {device}"
    print_result("estimate_training", training_seconds / 3600, unit, f"{len(plan.runs)} runs")
    print_result("estimate_test_passes", test_seconds / 3600, unit, "one test pass per epoch")
    print_result("estimate_parse", parse_seconds / 3600, unit, f"{parse_images} images once")
    print_result("estimate_total", total / 3600, unit, "an estimate: measured step rates only, one run at a time")
    return {"training_seconds": training_seconds, "test_seconds": test_seconds,
            "parse_seconds": parse_seconds, "total_seconds": total}


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="device to measure on (default cuda)")
    parser.add_argument("--dry-run", action="store_true", help="print the run plan and exit without measuring")
    parser.add_argument(
        "--config", type=Path, default=REPO_ROOT / "config.yaml",
        help="workflow configuration whose experiments are counted (default: config.yaml of the repository)",
    )
    parser.add_argument("--parse-images", type=int, default=512, help="images for the parse benchmark (default 512)")
    parser.add_argument("--parse-batch-size", type=int, default=64, help="project parser batch size (default 64)")
    parser.add_argument("--data-images", type=int, default=4096, help="images for the data benchmark (default 4096)")
    parser.add_argument("--train-steps", type=int, default=20, help="training steps per timed run (default 20)")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers on both sides (default 8)")
    parser.add_argument("--matmul-size", type=int, default=8192, help="side of the square matmul (default 8192)")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for generated files (default: a temporary one)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.parse_images, args.parse_batch_size, args.data_images, args.train_steps = 4, 2, 32, 1
        args.workers, args.matmul_size, args.repeats = 0, 256, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    config, source = load_config(args.config)
    plan = build_plan(config, source)
    print_plan(plan)
    if args.dry_run:
        return 0
    on_cuda = args.device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        print(f"error: --device {args.device} requested, but torch {torch.__version__} sees no CUDA device; "
              "run on a GPU machine, or pass --dry-run or --device cpu", file=sys.stderr)
        return 2
    # NOTE: the CUDA path has not been run in this project yet (written on a CPU-only machine).
    apply_threads(args.threads)
    if on_cuda:
        torch.backends.cudnn.benchmark = True  # as the trainer sets it for CUDA runs
    machine = print_machine(args.device)

    from bench_data import measure_data
    from bench_parse import measure_parse
    from bench_train import measure_train

    amp_dtype = torch.bfloat16 if on_cuda else None
    matmul_dtype = torch.bfloat16 if on_cuda else torch.float32
    quick_sizes = dict(image_size=32, input_size=64) if args.quick else dict(image_size=256, input_size=512)
    crop_size = 56 if args.quick else plan.crop_size
    batch_size = 2 if args.quick else plan.batch_size

    print("== parse")
    parse = measure_parse(
        args.parse_images, quick_sizes["image_size"], quick_sizes["input_size"], args.parse_batch_size, args.workers,
        args.repeats, matmul_size=args.matmul_size, matmul_dtype=matmul_dtype, device=args.device,
        workdir=None if args.workdir is None else args.workdir / "parse",
    )
    print("== data path")
    data = measure_data(
        args.data_images, 100, 64 if args.quick else 256, crop_size, batch_size, args.workers, args.repeats,
        device=args.device, workdir=None if args.workdir is None else args.workdir / "data",
    )
    print("== training step")
    variants = plan.variants()
    if "baseline" in variants:
        variants.remove("baseline")
        variants.insert(0, "baseline")
    train = measure_train(
        variants, batch_size, crop_size, args.train_steps, args.repeats, device=args.device, amp_dtype=amp_dtype,
        channels_last=on_cuda, matmul_size=args.matmul_size, matmul_dtype=matmul_dtype, with_eval=True,
    )
    print("== estimate")
    train_rates = {name: values["images_per_s"] for name, values in train["variants"].items()}
    totals = estimate(plan, train_rates, train["eval_images_per_s"], parse["project_images_per_s"], args.device)
    if args.quick:
        print("note: --quick sizes; the estimate above says nothing about the real run time")
    write_json(args.json_path, {
        "machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
        "plan": {"runs": len(plan.runs), "source": plan.source, "epochs": plan.epochs},
        "parse": parse, "data": data, "train": train, "estimate": totals,
    })
    return 0 if all(math.isfinite(value) for value in totals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
