"""Command line of stage 2: ``slfer train`` and ``slfer evaluate``.

``slfer train --config run.yaml`` reads the same keys as the flags (with underscores,
e.g. ``backbone_weights``); flags given on the command line override the file, and an
unknown key in the file is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from slfer import __version__

log = logging.getLogger(__name__)

# Keys without a default: they must come from the command line or --config.
REQUIRED_TRAIN_KEYS = ("cache", "out", "variant", "seed", "backbone_weights")


def _train_defaults() -> dict[str, Any]:
    from slfer.train import TrainConfig

    return {
        field.name: field.default
        for field in dataclasses.fields(TrainConfig)
        if field.default is not dataclasses.MISSING
    }


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``slfer train``. Flags default to None so that --config values can fill them."""
    from slfer.variants import VARIANTS

    defaults = _train_defaults()
    parser = subparsers.add_parser(
        "train",
        help="train one SLFER model and evaluate it on the test split",
        description="Train one SLFER variant on an image cache and its mask archive. Resumes from "
        "OUT/checkpoint.pt when it exists. Launch with torchrun for data-parallel training.",
    )
    parser.add_argument("--config", type=Path, help="YAML file with any of the keys below (underscores); flags override it")
    parser.add_argument("--cache", help="image cache (HDF5) written by slfer-parse cache")
    parser.add_argument(
        "--archive",
        help="mask archive (HDF5) written by slfer-parse parse; required by every variant except baseline",
    )
    parser.add_argument("--out", help="run folder for config.json, epochs.csv, checkpoint.pt, model.pt, metrics.json")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="model variant of the ablation")
    parser.add_argument("--seed", type=int, help="seed of weight initialisation, batch order and augmentation")
    parser.add_argument(
        "--backbone-weights",
        help="ResNet-18 initialisation: a checkpoint PATH (resnet18_msceleb.pth or ijba_res18_naive.pth.tar, "
        "format detected from its keys), 'imagenet' (torchvision weights) or 'none' (random). Required, "
        "because the paper's MS-Celeb-1M file must be supplied by hand",
    )
    parser.add_argument("--lambda1", type=float, help=f"weight of the segmentation (ST) loss (default {defaults['lambda1']})")
    parser.add_argument("--lambda2", type=float, help=f"weight of the component (CT) loss (default {defaults['lambda2']})")
    parser.add_argument(
        "--top-n", type=int, help=f"number of largest face parts marked positive for CT (default {defaults['top_n']})"
    )
    parser.add_argument(
        "--ct-labels",
        choices=("archive", "crop"),
        help="CT targets from the archive's whole-image counts, or recomputed on each training crop "
        f"(default {defaults['ct_labels']})",
    )
    parser.add_argument("--epochs", type=int, help=f"number of training epochs (default {defaults['epochs']})")
    parser.add_argument(
        "--batch-size",
        type=int,
        help=f"global batch size in images, split over torchrun processes (default {defaults['batch_size']})",
    )
    parser.add_argument("--lr", type=float, help=f"Adam learning rate (default {defaults['lr']})")
    parser.add_argument(
        "--betas", type=float, nargs=2, metavar=("BETA1", "BETA2"), help=f"Adam betas (default {list(defaults['betas'])})"
    )
    parser.add_argument(
        "--milestones",
        type=int,
        nargs="+",
        metavar="EPOCH",
        help=f"epochs after which the lr is multiplied by gamma (default {list(defaults['milestones'])})",
    )
    parser.add_argument("--gamma", type=float, help=f"lr factor at each milestone (default {defaults['gamma']})")
    parser.add_argument(
        "--crop-size", type=int, help=f"side of the square training and test crop in pixels (default {defaults['crop_size']})"
    )
    parser.add_argument("--device", help="auto (CUDA when available), cpu, cuda or cuda:INDEX (default auto)")
    parser.add_argument(
        "--amp",
        choices=("auto", "bf16", "fp16", "off"),
        help="mixed precision: auto is bf16 on CUDA GPUs that support it, fp16 with a grad scaler on other "
        "GPUs, and off on CPU (default auto)",
    )
    parser.add_argument(
        "--channels-last",
        choices=("auto", "on", "off"),
        help="channels-last memory format; auto is on for CUDA, off on CPU (default auto)",
    )
    parser.add_argument("--train-split", help=f"split name to train on (default {defaults['train_split']})")
    parser.add_argument("--test-split", help=f"split name to evaluate on (default {defaults['test_split']})")
    parser.add_argument(
        "--workers",
        type=int,
        help="CPU threads for torch operations; 0 keeps torch's default (default 0). Batches come from RAM, "
        "so no loader processes are started",
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        metavar="EPOCH",
        help="exit after this epoch with checkpoint.pt written; rerun the command to resume (not a config key)",
    )
    parser.set_defaults(func=run_train)


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``slfer evaluate``."""
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a trained model on any image cache",
        description="Evaluate RUN_DIR/model.pt on a split of an image cache (no mask archive needed) and "
        "write metrics.json, predictions.csv and features.npz.",
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="model.pt of a finished training run")
    parser.add_argument("--cache", type=Path, required=True, help="image cache (HDF5) written by slfer-parse cache")
    parser.add_argument("--split", default="test", help="split name to evaluate (default test)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:INDEX")
    parser.add_argument("--batch-size", type=int, help="images per batch (default: the training batch size)")
    parser.set_defaults(func=run_evaluate)


def build_parser() -> argparse.ArgumentParser:
    """Return the ``slfer`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(prog="slfer", description="Train and evaluate SLFER expression recognition models.")
    parser.add_argument("--version", action="version", version=f"slfer {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_train_parser(subparsers)
    add_evaluate_parser(subparsers)
    return parser


def read_config_file(path: Path, allowed: set[str]) -> dict[str, Any]:
    """Read a YAML mapping of training keys; raise ``ValueError`` naming unknown keys."""
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"config file {path} not found") from None
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is not valid YAML: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values, got {type(values).__name__}")
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValueError(f"config file {path} has unknown keys {unknown}; allowed keys: {sorted(allowed)}")
    return values


def resolve_train_config(args: argparse.Namespace):
    """Merge defaults, the --config file and explicit flags into a ``TrainConfig``."""
    from slfer.train import TrainConfig

    allowed = {field.name for field in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    if args.config is not None:
        values.update(read_config_file(args.config, allowed))
    for key in allowed:
        flag_value = getattr(args, key, None)
        if flag_value is not None:
            values[key] = flag_value
    values.setdefault("archive", None)
    missing = [key for key in REQUIRED_TRAIN_KEYS if values.get(key) is None]
    if missing:
        flags = ", ".join("--" + key.replace("_", "-") for key in missing)
        raise ValueError(f"missing required settings: {flags} (give them as flags or in --config)")
    return TrainConfig(**values)


def run_train(args: argparse.Namespace) -> int:
    """Run ``slfer train``."""
    import torch.distributed as dist

    from slfer.train import train

    config = resolve_train_config(args)
    try:
        train(config, stop_after=args.stop_after)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``slfer evaluate``."""
    import torch

    from slfer.evaluate import evaluate_model_file

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    evaluate_model_file(args.checkpoint, args.cache, args.out, split=args.split, device=device, batch_size=args.batch_size)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``slfer`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from slfer.pretrained import BackboneWeightsError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, BackboneWeightsError) as error:
        # Bad input: print the reason without a traceback and exit with status 2 like argparse.
        log.error("%s", error)
        return 2
    except KeyboardInterrupt:
        # Checkpoints are written atomically after each epoch, so nothing is half-written.
        log.error("interrupted; rerun the same command to resume from the last finished epoch")
        return 130


if __name__ == "__main__":
    sys.exit(main())
