"""Timing, FLOP and memory helpers shared by the benchmark scripts.

Every benchmark runs its two sides in one process and interleaves them
(A, B, A, B, ...), so that load from other processes on a shared machine hits
both sides alike. The ratio of medians is the figure to trust, the absolute
rates less so. Output lines use three fixed prefixes that
``tests/test_bench_smoke.py`` parses:

    machine <key>: <value>
    result <name>: <value> <unit> (...)
    ratio <name>: <value>x
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or platform's guess elsewhere."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Return the number of cores this process may run on (affinity, not the host total)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def describe_machine(device: str = "cpu") -> dict[str, str]:
    """Collect the facts that a reader needs to compare these numbers with their own."""
    import cv2
    import torchvision

    info = {
        "cpu": cpu_model(),
        "cores": str(usable_cores()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = str(torch.version.cuda)
    try:
        load = os.getloadavg()
        info["load_average_1_5_15"] = " ".join(f"{value:.2f}" for value in load)
    except OSError:
        pass
    return info


def print_machine(device: str = "cpu") -> dict[str, str]:
    """Print one ``machine <key>: <value>`` line per fact and return the facts."""
    info = describe_machine(device)
    for key, value in info.items():
        print(f"machine {key}: {value}")
    return info


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags that every benchmark script shares."""
    parser.add_argument(
        "--repeats", type=int, default=3,
        help="timed rounds per side; each round runs every side once, in turn (default 3)",
    )
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads (default: torch's own choice, usually the core count)",
    )
    parser.add_argument(
        "--json", type=Path, default=None, dest="json_path",
        help="also write every measurement to this JSON file",
    )
    parser.add_argument(
        "--profile", action="store_true",
        help="after the timed rounds, profile one more run of the project side and print the top entries",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="run at a minimal size to check that the script works; the timings mean nothing",
    )


def apply_threads(threads: int | None) -> None:
    """Set torch's intra-op thread count when the user asked for one."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def synchronize(device: str) -> None:
    """Wait for queued GPU work so that a wall-clock reading covers it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleave(
    cases: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: str = "cpu",
) -> dict[str, list[float]]:
    """Time each case ``repeats`` times, taking the cases in turn within every round.

    Warm-up rounds run every case once untimed (first-call allocation, lazy
    imports, cuDNN autotuning). Returns wall-clock seconds per case and round.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        for run_case in cases.values():
            run_case()
            synchronize(device)
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range(repeats):
        for name, run_case in cases.items():
            synchronize(device)
            start = time.perf_counter()
            run_case()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
        print(
            f"round {round_index + 1}/{repeats}: "
            + ", ".join(f"{name} {values[-1]:.3f} s" for name, values in seconds.items()),
            flush=True,
        )
    return seconds


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def matmul_seconds(size: int, dtype: torch.dtype, device: str, inner: int) -> Callable[[], None]:
    """Build a case that runs ``inner`` square matmuls of side ``size`` on fixed operands."""
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    right = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)

    def run() -> None:
        for _ in range(inner):
            torch.matmul(left, right, out=out)

    return run


def matmul_flops(size: int, inner: int) -> int:
    """FLOPs of ``inner`` square matmuls, counting a multiply-add as 2 as FlopCounterMode does."""
    return 2 * size**3 * inner


def count_flops(run: Callable[[], object]) -> int:
    """Count the FLOPs that ``run`` dispatches, with torch.utils.flop_counter.FlopCounterMode.

    The counter covers matmuls and convolutions (forward and backward) and
    ignores elementwise work, so it is the usual "model FLOPs" figure.
    """
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return int(counter.get_total_flops())


def print_result(name: str, value: float, unit: str, detail: str = "") -> None:
    suffix = f" ({detail})" if detail else ""
    print(f"result {name}: {value:.4g} {unit}{suffix}", flush=True)


def print_ratio(name: str, value: float) -> None:
    print(f"ratio {name}: {value:.3f}x", flush=True)


def format_runs(seconds: Sequence[float]) -> str:
    return "median of " + str(len(seconds)) + "; runs " + " ".join(f"{s:.3f}" for s in seconds) + " s"


def write_json(path: Path | None, payload: dict) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


# A small Python process starts each measured child and reports the child's peak.
# Linux keeps a process's peak RSS across exec, so a child forked straight from
# this process (torch loaded, hundreds of MiB) would report at least this
# process's peak. A child of the small launcher starts from the launcher's peak.
_LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(child.pid, 0)
child.returncode = os.waitstatus_to_exitcode(status)
print(f"run_child peak_rss_kib {usage.ru_maxrss} {child.returncode}", flush=True)
"""
_PEAK_MARKER = "run_child peak_rss_kib "


def run_child(command: Sequence[str], env: Mapping[str, str] | None = None) -> tuple[float, int, str]:
    """Run ``command`` in a fresh process; return (wall seconds, peak RSS in bytes, output).

    The peak is ``ru_maxrss`` from ``os.wait4`` on that process alone, taken by
    a small launcher process (see ``_LAUNCHER``). It covers the process and
    the children it waited for (as a maximum, not a sum). Linux reports
    ``ru_maxrss`` in KiB. Raises RuntimeError with the child's output when it
    exits non-zero.
    """
    if sys.platform != "linux":
        raise RuntimeError(f"run_child reads Linux's ru_maxrss semantics; this is {sys.platform}")
    start = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=None if env is None else dict(env),
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - start
    output, _, marker = completed.stdout.rpartition(_PEAK_MARKER)
    if not marker:
        raise RuntimeError(f"the launcher of {' '.join(command)} reported no peak:\n{completed.stdout}")
    peak_kib, returncode = (int(field) for field in marker.split())
    if returncode != 0:
        raise RuntimeError(f"command failed with exit code {returncode}: {' '.join(command)}\n{output}")
    return elapsed, peak_kib * 1024, output


def face_source() -> np.ndarray:
    """Return a real portrait (scikit-image's public-domain astronaut), uint8 [512, 512, 3] RGB."""
    from skimage import data

    return data.astronaut()


def write_dataset(
    root: Path,
    count: int,
    size: int,
    seed: int = 0,
    suffix: str = ".jpg",
    label_maps_root: Path | None = None,
) -> list[Path]:
    """Write ``count`` face images as ``root/train/<expression>/<index>.<suffix>``.

    The images are random crops, flips and brightness shifts of one real
    portrait, so that JPEG decoding and the parser see photograph-like
    content. When ``label_maps_root`` is given, a 19-class uint8 PNG label map
    of the same size goes to ``label_maps_root/train/<expression>/<index>.png``
    (nested ellipses for skin, eyes, nose and mouth over background and hair),
    the layout that ``slfer-parse parse --backend labels`` reads.
    Returns the image paths in the order written.
    """
    import cv2

    from parsing.labels import EXPRESSIONS

    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if suffix not in (".jpg", ".png"):
        raise ValueError(f"suffix must be '.jpg' or '.png', got {suffix!r}")
    rng = np.random.default_rng(seed)
    portrait = face_source()
    paths: list[Path] = []
    for index in range(count):
        expression = EXPRESSIONS[index % len(EXPRESSIONS)]
        # A square window around the face, jittered by up to 40 pixels.
        side = int(rng.integers(220, 300))
        top = int(rng.integers(0, 80))
        left = int(rng.integers(120, 200))
        crop = portrait[top : top + side, left : left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = np.clip(crop.astype(np.float32) * rng.uniform(0.7, 1.3), 0, 255).astype(np.uint8)
        image = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
        path = root / "train" / expression / f"{index:05d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"cv2.imwrite failed for {path}")
        paths.append(path)
        if label_maps_root is not None:
            label_path = label_maps_root / "train" / expression / f"{index:05d}.png"
            label_path.parent.mkdir(parents=True, exist_ok=True)
            if not cv2.imwrite(str(label_path), synthetic_label_map(size, rng)):
                raise OSError(f"cv2.imwrite failed for {label_path}")
    return paths


def synthetic_label_map(size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw a 19-class face layout (class ids of facexlib's BiSeNet), uint8 [size, size]."""
    import cv2

    labels = np.zeros((size, size), np.uint8)
    centre = size // 2 + int(rng.integers(-size // 16, size // 16 + 1))

    def ellipse(cx: float, cy: float, ax: float, ay: float, label: int) -> None:
        axes = (max(1, int(ax * size)), max(1, int(ay * size)))
        cv2.ellipse(labels, (int(cx), int(cy)), axes, 0, 0, 360, int(label), -1)

    ellipse(centre, 0.42 * size, 0.40, 0.40, 17)  # hair
    ellipse(centre, 0.95 * size, 0.35, 0.15, 14)  # neck
    ellipse(centre, 0.55 * size, 0.30, 0.38, 1)  # skin
    ellipse(centre - 0.32 * size, 0.55 * size, 0.04, 0.08, 7)  # left ear
    ellipse(centre + 0.32 * size, 0.55 * size, 0.04, 0.08, 8)  # right ear
    ellipse(centre - 0.12 * size, 0.45 * size, 0.06, 0.03, 4)  # left eye
    ellipse(centre + 0.12 * size, 0.45 * size, 0.06, 0.03, 5)  # right eye
    ellipse(centre, 0.60 * size, 0.04, 0.08, 10)  # nose
    ellipse(centre, 0.75 * size, 0.10, 0.04, 12)  # upper lip
    return labels


def print_cprofile(run: Callable[[], object], top: int = 15) -> None:
    """Run ``run`` once under cProfile and print its ``top`` entries by total and by own time.

    cProfile records this process only, so work in DataLoader worker processes
    shows up as time waiting for batches.
    """
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(run)
    for order in ("cumulative", "tottime"):
        buffer = io.StringIO()
        pstats.Stats(profiler, stream=buffer).strip_dirs().sort_stats(order).print_stats(top)
        print(f"profile cProfile by {order}:")
        print(buffer.getvalue().split("\n", 4)[-1].rstrip())


def print_torch_profile(run: Callable[[], object], top: int = 15) -> None:
    """Run ``run`` once under torch.profiler and print the ``top`` operators by own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as profiler:
        run()
    print("profile torch.profiler by self CPU time:")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
