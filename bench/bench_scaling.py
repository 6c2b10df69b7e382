"""Benchmark how the parse stage scales: time and peak memory at N and 4N images.

Each run is ``slfer-parse parse --backend bisenet`` in a fresh Python process,
so that every run's peak resident set size is its own. The peak comes from
``os.wait4`` on that process. Linux reports it as the maximum over the
process and the DataLoader workers it reaped, not their sum. Runs alternate
N, 4N, N, 4N, ... over the rounds. Expected: time ratio about 4 (the work is
per image), peak memory ratio about 1 (the archive is written batch by batch,
so memory must not grow with the dataset). Also prints the archive's bytes on
disk per image.

The default parser input is 128 px, so that 4N images finish in about a
minute on two idle cores. The input size changes the cost per image but not
the memory behaviour under test.

    python3 bench/bench_scaling.py                    # N = 64, input 128
    python3 bench/bench_scaling.py --images 256 --input-size 512
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_parse import build_image_cache, project_parse_arguments, save_random_bisenet  # noqa: E402
from common import (  # noqa: E402
    add_common_arguments,
    apply_threads,
    median,
    print_machine,
    print_ratio,
    print_result,
    run_child,
    write_dataset,
    write_json,
)

# The child times the parse call itself, so that the interpreter start and the
# imports (a few seconds, the same at every size) stay out of the time ratio.
CHILD_SCRIPT = """
import sys, time
from parsing.cli import main
start = time.perf_counter()
status = main(sys.argv[1:])
print(f"parse_seconds {time.perf_counter() - start:.6f}")
sys.exit(0 if status is None else status)
"""


def child_parse(arguments: list[str], archive: Path, threads: int | None) -> tuple[float, float, int]:
    """Parse in a fresh process; return (wall seconds, parse seconds, peak RSS bytes)."""
    archive.unlink(missing_ok=True)
    env = dict(os.environ)
    if threads is not None:
        # torch sizes its intra-op pool from OMP_NUM_THREADS at start-up.
        env["OMP_NUM_THREADS"] = str(threads)
    wall, peak, output = run_child([sys.executable, "-c", CHILD_SCRIPT, *arguments], env=env)
    lines = [line for line in output.splitlines() if line.startswith("parse_seconds ")]
    if not lines:
        raise RuntimeError(f"the parse child printed no parse_seconds line:\n{output}")
    return wall, float(lines[-1].split()[1]), peak


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="N, the smaller image count (default 64)")
    parser.add_argument("--factor", type=int, default=4, help="the larger count is N times this (default 4)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the images and cache (default 256)")
    parser.add_argument("--input-size", type=int, default=128, help="parser input side in pixels (default 128)")
    parser.add_argument("--batch-size", type=int, default=16, help="parser batch size (default 16)")
    parser.add_argument("--workers", type=int, default=2, help="parser DataLoader workers (default 2)")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for generated files (default: a temporary one)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.factor, args.image_size, args.input_size, args.batch_size = 1, 2, 32, 32, 2
        args.workers, args.repeats = 0, 1
    if args.factor < 2:
        parser.error(f"--factor must be at least 2, got {args.factor}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    apply_threads(args.threads)
    machine = print_machine("cpu")
    sizes = (args.images, args.images * args.factor)
    print(f"config: {sizes[0]} and {sizes[1]} images of {args.image_size} px, parser input {args.input_size}, "
          f"batch {args.batch_size}, {args.workers} workers, {args.repeats} rounds, one process per run")

    work = Path(tempfile.mkdtemp(prefix="bench_scaling_")) if args.workdir is None else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[int, dict[str, list[float]]] = {count: {"wall": [], "parse": [], "peak": []} for count in sizes}
    archive_bytes: dict[int, int] = {}
    try:
        weights = save_random_bisenet(work / "bisenet_random.pth")
        arguments = {}
        for count in sizes:
            # The generator is seeded, so the first N images of the larger set equal the smaller set.
            write_dataset(work / f"images_{count}", count, args.image_size)
            cache = work / f"cache_{count}.h5"
            build_image_cache(work / f"images_{count}", cache, args.image_size)
            arguments[count] = project_parse_arguments(
                cache, work / f"masks_{count}.h5", weights, args.input_size, args.batch_size, args.workers, "cpu"
            )
        for round_index in range(args.repeats):
            for count in sizes:
                wall, parse_seconds, peak = child_parse(arguments[count], work / f"masks_{count}.h5", args.threads)
                runs[count]["wall"].append(wall)
                runs[count]["parse"].append(parse_seconds)
                runs[count]["peak"].append(peak)
                print(f"round {round_index + 1}/{args.repeats}: {count} images, parse {parse_seconds:.2f} s, "
                      f"process {wall:.2f} s, peak RSS {peak / 2**20:.1f} MiB", flush=True)
        for count in sizes:
            archive_bytes[count] = (work / f"masks_{count}.h5").stat().st_size
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    small, large = sizes
    for count in sizes:
        parse_seconds = median(runs[count]["parse"])
        print_result(f"scaling_parse_{count}", parse_seconds, "s", f"{count / parse_seconds:.2f} images/s")
        print_result(f"scaling_process_{count}", median(runs[count]["wall"]), "s", "interpreter start and imports included")
        print_result(f"scaling_peak_rss_{count}", median(runs[count]["peak"]) / 2**20, "MiB")
        print_result(f"scaling_archive_{count}", archive_bytes[count] / count, "bytes/image")
    # A line through the two sizes splits the parse time into a fixed part per run (weights,
    # model build, worker start) and a part per image. Only the part per image should scale.
    per_image = (median(runs[large]["parse"]) - median(runs[small]["parse"])) / (large - small)
    fixed = median(runs[small]["parse"]) - per_image * small
    print_result("scaling_seconds_per_image", per_image, "s", "marginal, from the two sizes")
    print_result("scaling_fixed_seconds", fixed, "s", "per run, from the two sizes")
    growth = (median(runs[large]["peak"]) - median(runs[small]["peak"])) / (large - small)
    print_result("scaling_peak_growth", growth / 1024, "KiB/image", "peak RSS difference over image difference")
    print_ratio("scaling_time_large_over_small", median(runs[large]["parse"]) / median(runs[small]["parse"]))
    print_ratio("scaling_peak_large_over_small", median(runs[large]["peak"]) / median(runs[small]["peak"]))
    write_json(args.json_path, {
        "machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
        "runs": {str(count): values for count, values in runs.items()},
        "archive_bytes": {str(count): value for count, value in archive_bytes.items()},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
