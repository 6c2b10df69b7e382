"""The ``slfer-parse`` command: datasets, image caches, face parsing and mask archives.

Each module that owns commands provides ``add_commands(subparsers)``; every subcommand sets
``func``, a callable that takes the parsed arguments and returns the exit code. Commands import
their modules when they run, so that ``slfer-parse --help`` does not wait for torch to load.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from parsing.labels import DEFAULT_MERGE_19_TO_8, DEFAULT_TOP_N

logger = logging.getLogger(__name__)


def _shard_argument(text: str) -> tuple[int, int]:
    from parsing.archive import parse_shard_spec

    try:
        return parse_shard_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _merge_argument(text: str) -> tuple[int, ...]:
    from parsing.archive import parse_merge_table

    try:
        return parse_merge_table(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


MERGE_HELP = "19 -> 8 merge table: 19 comma-separated coarse class ids (0..7), entry i for BiSeNet class i"


# ---------------------------------------------------------------------------------------------
# Command implementations


def run_parse(args: argparse.Namespace) -> int:
    from parsing.archive import ArchiveSettings
    from parsing.parsers import build_mask_parser, parse_cache

    if args.backend == "labels" and args.weights is not None:
        raise ValueError("--weights applies to the bisenet backend only")
    if args.backend == "bisenet" and args.labels_root is not None:
        raise ValueError("--labels-root applies to the labels backend only")
    merge = args.merge if args.merge is not None else DEFAULT_MERGE_19_TO_8
    settings = ArchiveSettings(merge, top_n=args.top_n)
    parser = build_mask_parser(
        args.backend,
        weights=args.weights,
        labels_root=args.labels_root,
        input_size=args.input_size,
        device=args.device,
        precision=args.precision,
    )
    parse_cache(
        args.cache, args.out, parser, settings, shard=args.shard, batch_size=args.batch_size, workers=args.workers
    )
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from parsing.archive import merge_shards

    merge_shards(args.shards, args.out)
    return 0


def run_derive(args: argparse.Namespace) -> int:
    from parsing.archive import derive_archive

    if args.merge is None and args.top_n is None:
        logger.warning("neither --merge nor --top-n given: the derived archive repeats the input's settings")
    derive_archive(args.archive, args.out, merge_19_to_8=args.merge, top_n=args.top_n)
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from parsing.archive import validate_archive

    problems = validate_archive(args.archive, args.cache, check_content=args.check_content)
    if problems:
        print(f"mask archive {args.archive} does not match image cache {args.cache}:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"mask archive {args.archive} matches image cache {args.cache}")
    return 0


def run_figure(args: argparse.Namespace) -> int:
    from parsing.figure import plot_mask_grid

    plot_mask_grid(
        args.archive, args.cache, args.out, count=args.count, seed=args.seed, alpha=args.alpha,
        columns=args.columns, split=args.split,
    )  # fmt: skip
    return 0


def run_download_weights(args: argparse.Namespace) -> int:
    from parsing.weights import download_weights

    sha256 = download_weights(args.out, url=args.url, expected_sha256=args.sha256, timeout=args.timeout)
    print(f"{sha256}  {args.out}")
    return 0


def run_check_weights(args: argparse.Namespace) -> int:
    from parsing.weights import check_weights

    summary = check_weights(args.weights, expected_sha256=args.sha256)
    print(
        f"{summary['path']}: loads strictly into BiSeNet(num_class=19); {summary['tensors']} tensors, "
        f"{summary['parameters']} parameters, sha256 {summary['sha256']}"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# Argument parsers


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register parse, merge, derive, validate, figure, download-weights and check-weights."""
    from parsing.weights import FACEXLIB_BISENET_URL

    parse = subparsers.add_parser(
        "parse", help="parse the images of an image cache into a mask archive",
        description="Run a face parser over an image cache (or one shard of it) and write a mask archive.",
    )  # fmt: skip
    parse.add_argument("--cache", required=True, help="image cache (HDF5) written by `slfer-parse cache`")
    parse.add_argument("--out", required=True, help="mask archive to write (HDF5)")
    parse.add_argument(
        "--backend", choices=("bisenet", "labels"), default="bisenet", help="mask source (default: bisenet)"
    )
    parse.add_argument("--weights", help="BiSeNet weights file (bisenet backend), e.g. resources/parsing_bisenet.pth")
    parse.add_argument(
        "--labels-root", help="folder of 19-class label PNGs (labels backend): FOLDER/<image name with suffix .png>"
    )
    parse.add_argument(
        "--input-size", type=_positive_int, default=512, help="BiSeNet input size in pixels (default: 512)"
    )
    parse.add_argument("--batch-size", type=_positive_int, default=16, help="images per batch (default: 16)")
    parse.add_argument(
        "--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N (default: auto)"
    )
    parse.add_argument(
        "--precision", choices=("auto", "fp32", "fp16"), default="auto",
        help="BiSeNet arithmetic: auto is fp16 on CUDA and fp32 on the CPU (default: auto)",
    )  # fmt: skip
    parse.add_argument(
        "--workers", type=_non_negative_int, default=2, help="DataLoader processes reading the cache (default: 2)"
    )
    parse.add_argument(
        "--merge", type=_merge_argument, help=MERGE_HELP + " (default: parsing.labels.DEFAULT_MERGE_19_TO_8)"
    )
    parse.add_argument(
        "--top-n", type=_non_negative_int, default=DEFAULT_TOP_N,
        help=f"number of dominant coarse classes marked in /topn (default: {DEFAULT_TOP_N})",
    )  # fmt: skip
    parse.add_argument(
        "--shard", type=_shard_argument,
        help="parse only block i of k of the cache (0-based), e.g. 0/4, and combine the shards with `merge`",
    )
    parse.set_defaults(func=run_parse)

    merge = subparsers.add_parser(
        "merge", help="merge shard archives into one archive",
        description="Concatenate the shard archives of one cache into the archive a single run would write.",
    )  # fmt: skip
    merge.add_argument("--out", required=True, help="merged mask archive to write")
    merge.add_argument("shards", nargs="+", help="shard archives written by `parse --shard i/k`, in any order")
    merge.set_defaults(func=run_merge)

    derive = subparsers.add_parser(
        "derive",
        help="rewrite an archive with another merge table or top-n, without parsing again",
        description="Copy a mask archive's 19-class masks and counts into a new archive whose 8-class "
        "masks, counts and top-n labels follow another merge table and/or n.",
    )
    derive.add_argument("--archive", required=True, help="existing mask archive")
    derive.add_argument("--out", required=True, help="new mask archive to write")
    derive.add_argument("--merge", type=_merge_argument, help=MERGE_HELP + " (default: the input archive's table)")
    derive.add_argument(
        "--top-n", type=_non_negative_int, help="number of dominant coarse classes (default: the input archive's)"
    )
    derive.set_defaults(func=run_derive)

    validate = subparsers.add_parser(
        "validate", help="check that a mask archive matches an image cache",
        description="Exit 0 when the archive matches the cache, else exit 1 and list every difference.",
    )  # fmt: skip
    validate.add_argument("--archive", required=True, help="mask archive to check")
    validate.add_argument("--cache", required=True, help="local image cache the archive should describe")
    validate.add_argument(
        "--check-content", action="store_true",
        help="also recompute masks8, counts and top-n from masks19 (reads every mask)",
    )  # fmt: skip
    validate.set_defaults(func=run_validate)

    figure = subparsers.add_parser("figure", help="draw example images with their 8-class masks (Figure 5)")
    figure.add_argument("--archive", required=True, help="mask archive")
    figure.add_argument("--cache", required=True, help="image cache the archive belongs to")
    figure.add_argument(
        "--out", required=True, help="image file to write; the suffix sets the format (.png, .pdf, .svg)"
    )
    figure.add_argument("--count", type=_positive_int, default=8, help="number of example images (default: 8)")
    figure.add_argument("--seed", type=int, default=0, help="seed for choosing the examples (default: 0)")
    figure.add_argument("--columns", type=_positive_int, default=4, help="examples per row (default: 4)")
    figure.add_argument("--alpha", type=float, default=0.5, help="opacity of the mask colours, 0..1 (default: 0.5)")
    figure.add_argument("--split", help="take examples from this split only (default: all splits)")
    figure.set_defaults(func=run_figure)

    download = subparsers.add_parser(
        "download-weights", help="download BiSeNet weights and check that they load",
        description="Download BiSeNet weights, check that they load strictly, print their sha256 and "
        "write it to OUT.sha256.",
    )  # fmt: skip
    download.add_argument("--out", required=True, help="weights file to write, e.g. resources/parsing_bisenet.pth")
    download.add_argument("--url", default=FACEXLIB_BISENET_URL, help=f"source URL (default: {FACEXLIB_BISENET_URL})")
    download.add_argument("--sha256", help="expected sha256 hex digest; a different file is rejected")
    download.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds (default: 60)")
    download.set_defaults(func=run_download_weights)

    check = subparsers.add_parser("check-weights", help="check that a weights file loads strictly into BiSeNet")
    check.add_argument("--weights", required=True, help="BiSeNet weights file")
    check.add_argument("--sha256", help="expected sha256 hex digest")
    check.set_defaults(func=run_check_weights)


def default_command_modules() -> list[ModuleType]:
    """Return the modules whose commands make up ``slfer-parse``, in help order."""
    from parsing import cache, synthetic

    return [cache, synthetic, sys.modules[__name__]]


def build_parser(command_modules: Sequence[ModuleType] | None = None) -> argparse.ArgumentParser:
    """Build the ``slfer-parse`` argument parser from the ``add_commands`` of ``command_modules``."""
    parser = argparse.ArgumentParser(
        prog="slfer-parse",
        description="Stage 1 of slfer: list datasets, build image caches, parse faces into mask archives.",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level (default: INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in command_modules if command_modules is not None else default_command_modules():
        module.add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None, command_modules: Sequence[ModuleType] | None = None) -> int:
    """Run ``slfer-parse`` and return its exit code: 0 success, 1 failure, 2 invalid arguments."""
    args = build_parser(command_modules).parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError) as error:
        # Invalid input and missing files end with their message, not a traceback; the message
        # names the file or value. Other exceptions are bugs and keep their traceback.
        logger.debug("command %s failed", args.command, exc_info=True)
        print(f"slfer-parse {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
