"""The ``slfer-parse synth`` and ``slfer-parse synth-figure`` subcommands."""

from __future__ import annotations

import argparse
import logging

from parsing.synthetic.dataset import generate_dataset
from parsing.synthetic.faces import DIFFICULTY_PRESETS, generator_config_for
from parsing.synthetic.figure import write_figure

logger = logging.getLogger(__name__)


def add_commands(subparsers) -> None:
    """Register ``synth`` and ``synth-figure`` on an argparse subparsers object."""
    synth = subparsers.add_parser(
        "synth",
        help="generate a synthetic face dataset with expression labels and 19-class label maps",
        description=(
            "Draw faces whose expression shows in their geometry (mouth, lip corners, brows, eyes, nose "
            "wrinkle), with per-pixel face-part labels in the BiSeNet class order. Writes "
            "ROOT/images/<split>/<class>/<stem>.png, ROOT/labels/<split>/<class>/<stem>.png and, last, "
            "ROOT/manifest.json. The same seed gives byte-identical files for any --workers."
        ),
    )
    synth.add_argument("--out", required=True, help="dataset root folder to create")
    synth.add_argument("--seed", required=True, type=int, help="random seed (non-negative integer)")
    synth.add_argument("--size", type=int, default=256, help="image side length in pixels (default: 256)")
    synth.add_argument("--train-per-class", type=int, default=200, help="train images per class (default: 200)")
    synth.add_argument("--test-per-class", type=int, default=50, help="test images per class (default: 50)")
    synth.add_argument(
        "--label-noise", type=float, default=0.1,
        help="fraction of images per split stored under a wrong class, listed in the manifest (default: 0.1)",
    )
    synth.add_argument(
        "--workers", type=int, default=0,
        help="worker processes; 0 draws in this process (default: 0). Does not change the output",
    )
    synth.add_argument(
        "--difficulty", choices=sorted(DIFFICULTY_PRESETS), default="standard",
        help="preset of expression strength and nuisance variation; easy suits short CPU runs (default: standard)",
    )
    synth.add_argument("--overwrite", action="store_true", help="replace an earlier dataset in --out")
    synth.set_defaults(func=run_synth)

    figure = subparsers.add_parser(
        "synth-figure",
        help="draw a grid of synthetic examples per class with their label maps overlaid",
    )
    figure.add_argument("--root", required=True, help="dataset root written by `slfer-parse synth`")
    figure.add_argument("--out", required=True, help="output PNG file")
    figure.add_argument("--columns", type=int, default=4, help="examples per class (default: 4)")
    figure.add_argument("--split", default="train", help="split to show (default: train)")
    figure.set_defaults(func=run_synth_figure)


def run_synth(args: argparse.Namespace) -> int:
    try:
        manifest = generate_dataset(
            args.out, args.seed, size=args.size, train_per_class=args.train_per_class,
            test_per_class=args.test_per_class, label_noise=args.label_noise, workers=args.workers,
            overwrite=args.overwrite, config=generator_config_for(args.difficulty),
        )
    except (ValueError, FileExistsError) as error:
        logger.error("synth failed: %s", error)
        return 1
    total = sum(sum(counts.values()) for counts in manifest["counts"].values())
    logger.info("Generated %d images in %s", total, args.out)
    return 0


def run_synth_figure(args: argparse.Namespace) -> int:
    try:
        write_figure(args.root, args.out, columns=args.columns, split=args.split)
    except (ValueError, FileNotFoundError) as error:
        logger.error("synth-figure failed: %s", error)
        return 1
    return 0
