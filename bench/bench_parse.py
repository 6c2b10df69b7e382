"""Benchmark the parse stage: ``slfer-parse parse --backend bisenet`` against a demo-style loop.

Project side: the image cache goes through ``slfer-parse parse`` (run in this
process through ``parsing.cli.main``), which batches images through BiSeNet,
reads the cache in DataLoader workers and writes the mask archive. Reference
side: the loop of the usual face-parsing demo scripts, which handles one image
at a time. It runs cv2.imread, BGR to RGB, a resize to the parser input, /255
and ImageNet normalisation, then BiSeNet on a batch of one and the argmax of
``out[0]``, a nearest resize back to the image size, and writes one PNG.

Both sides load the same weights file: a randomly initialised facexlib
``BiSeNet(num_class=19)`` state_dict that this script saves. Its values do not
change the cost, and the project's loader accepts it like the released file.
Both sides include loading the weights in every timed run. The cache is built
once from the image files; its build time is printed separately.

The parser's achieved FLOP/s (FlopCounterMode on one forward at the input
size, times images/s) is printed as a fraction of the fp32 matmul rate
measured in the same interleaved rounds.

    python3 bench/bench_parse.py                      # 16 images, parser input 512
    python3 bench/bench_parse.py --input-size 256 --images 64
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_common_arguments,
    apply_threads,
    count_flops,
    format_runs,
    interleave,
    matmul_flops,
    matmul_seconds,
    median,
    print_cprofile,
    print_machine,
    print_torch_profile,
    print_ratio,
    print_result,
    write_dataset,
    write_json,
)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def save_random_bisenet(path: Path, seed: int = 0) -> Path:
    """Save the state_dict of a freshly initialised facexlib BiSeNet(num_class=19) to ``path``."""
    from facexlib.parsing.bisenet import BiSeNet

    torch.manual_seed(seed)
    model = BiSeNet(num_class=19)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(model.state_dict(), temporary)
    temporary.replace(path)
    return path


def load_bisenet(weights: Path, device: str) -> torch.nn.Module:
    """Load BiSeNet the way the demo scripts do: build, load the state_dict strictly, eval mode."""
    from facexlib.parsing.bisenet import BiSeNet

    model = BiSeNet(num_class=19)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return model.to(device).eval()


def reference_parse(image_paths: list[Path], out_dir: Path, weights: Path, input_size: int, device: str) -> None:
    """Parse each image file on its own and write one 19-class PNG per image."""
    model = load_bisenet(weights, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for path in image_paths:
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None:
                raise OSError(f"cv2.imread failed for {path}")
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            height, width = rgb.shape[:2]
            resized = cv2.resize(rgb, (input_size, input_size), interpolation=cv2.INTER_LINEAR)
            normalised = (resized.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
            tensor = torch.from_numpy(normalised.transpose(2, 0, 1)).unsqueeze(0).to(device)  # [1, 3, s, s]
            out = model(tensor)[0]  # [1, 19, s, s]
            labels = out.squeeze(0).argmax(0).to("cpu").numpy().astype(np.uint8)
            labels = cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST)
            target = out_dir / f"{path.stem}.png"
            if not cv2.imwrite(str(target), labels):
                raise OSError(f"cv2.imwrite failed for {target}")


def build_image_cache(image_root: Path, cache: Path, size: int) -> float:
    """Build the project's image cache from ``image_root``; return the seconds it took."""
    from parsing.cache import build_cache
    from parsing.datasets import read_dataset

    start = time.perf_counter()
    listing = read_dataset("folder", image_root)
    build_cache(listing, cache, "bench", size=size)
    return time.perf_counter() - start


def project_parse_arguments(
    cache: Path, archive: Path, weights: Path, input_size: int, batch_size: int, workers: int, device: str
) -> list[str]:
    return [
        "parse", "--cache", str(cache), "--out", str(archive), "--backend", "bisenet", "--weights", str(weights),
        "--input-size", str(input_size), "--batch-size", str(batch_size), "--workers", str(workers),
        "--device", device,
    ]


def project_parse(arguments: list[str], archive: Path) -> None:
    """Run ``slfer-parse parse`` in this process, replacing any archive of an earlier round."""
    from parsing.cli import main as parse_cli

    archive.unlink(missing_ok=True)
    status = parse_cli(arguments)
    if status not in (0, None):
        raise RuntimeError(f"slfer-parse {' '.join(arguments)} exited with status {status}")


def bisenet_flops_per_image(input_size: int, device: str = "cpu") -> int:
    """Count the FLOPs of one BiSeNet forward on one image of side ``input_size``."""
    from facexlib.parsing.bisenet import BiSeNet

    model = BiSeNet(num_class=19).to(device).eval()
    with torch.no_grad():
        return count_flops(lambda: model(torch.zeros(1, 3, input_size, input_size, device=device)))


def measure_parse(
    images: int,
    image_size: int,
    input_size: int,
    batch_size: int,
    workers: int,
    repeats: int,
    suffix: str = ".jpg",
    matmul_size: int = 2048,
    matmul_dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    workdir: Path | None = None,
    profile: bool = False,
) -> dict:
    """Time both parse sides, interleaved with a matmul; print the result lines and return the figures."""
    work = Path(tempfile.mkdtemp(prefix="bench_parse_")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        image_paths = write_dataset(work / "images", images, image_size, suffix=suffix)
        weights = save_random_bisenet(work / "bisenet_random.pth")
        cache = work / "cache.h5"
        cache_seconds = build_image_cache(work / "images", cache, image_size)
        archive = work / "masks.h5"
        project_arguments = project_parse_arguments(
            cache, archive, weights, input_size, batch_size, workers, device
        )
        # Counting runs one real forward, which also warms up the convolution kernels for both sides.
        flops_per_image = bisenet_flops_per_image(input_size, device)
        matmul_inner = 4
        cases = {
            "reference": lambda: reference_parse(image_paths, work / "reference_masks", weights, input_size, device),
            "project": lambda: project_parse(project_arguments, archive),
            "matmul": matmul_seconds(matmul_size, matmul_dtype, device, matmul_inner),
        }
        seconds = interleave(cases, repeats=repeats, warmup=0, device=device)
        archive_bytes = archive.stat().st_size
        if profile:
            print_cprofile(cases["project"])
            print_torch_profile(cases["project"])
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    dtype_name = str(matmul_dtype).removeprefix("torch.")
    matmul_rate = matmul_flops(matmul_size, matmul_inner) / median(seconds["matmul"])
    reference_rate = images / median(seconds["reference"])
    project_rate = images / median(seconds["project"])
    with_cache = images / (median(seconds["project"]) + cache_seconds)
    print_result("cache_build", images / cache_seconds, "images/s", f"{cache_seconds:.2f} s, once per dataset")
    print_result(f"matmul_{dtype_name}", matmul_rate / 1e9, "GFLOP/s", f"{matmul_size}^2, " + format_runs(seconds["matmul"]))
    print_result("bisenet_flops", flops_per_image / 1e9, "GFLOP/image", f"input {input_size}")
    print_result("parse_reference", reference_rate, "images/s", format_runs(seconds["reference"]))
    print_result("parse_project", project_rate, "images/s", format_runs(seconds["project"]))
    print_result("archive_size", archive_bytes / images, "bytes/image")
    print_ratio("parse_project_over_reference", project_rate / reference_rate)
    print_ratio("parse_project_with_cache_build_over_reference", with_cache / reference_rate)
    print_ratio("parse_project_fraction_of_matmul", flops_per_image * project_rate / matmul_rate)
    print_ratio("parse_reference_fraction_of_matmul", flops_per_image * reference_rate / matmul_rate)
    return {
        "cache_build_seconds": cache_seconds,
        "matmul_flops": matmul_rate,
        "matmul_dtype": dtype_name,
        "bisenet_flops_per_image": flops_per_image,
        "reference_images_per_s": reference_rate,
        "project_images_per_s": project_rate,
        "ratio": project_rate / reference_rate,
        "project_fraction_of_matmul": flops_per_image * project_rate / matmul_rate,
        "archive_bytes_per_image": archive_bytes / images,
        "seconds": seconds,
    }


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="number of generated images (default 16)")
    parser.add_argument(
        "--image-size", type=int, default=256,
        help="side of the generated image files and of the cache in pixels (default 256)",
    )
    parser.add_argument("--input-size", type=int, default=512, help="parser input side in pixels (default 512)")
    parser.add_argument("--batch-size", type=int, default=16, help="project parser batch size (default 16)")
    parser.add_argument("--workers", type=int, default=2, help="project DataLoader workers (default 2)")
    parser.add_argument("--suffix", choices=(".jpg", ".png"), default=".jpg", help="image file format (default .jpg)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the square fp32 matmul (default 2048)")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for generated files (default: a temporary one)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.image_size, args.input_size, args.batch_size = 4, 32, 64, 2
        args.workers, args.repeats, args.matmul_size = 0, 1, 256
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    apply_threads(args.threads)
    machine = print_machine("cpu")
    print(f"config: {args.images} images of {args.image_size} px, parser input {args.input_size}, "
          f"batch {args.batch_size}, {args.workers} workers, {args.repeats} rounds")
    results = measure_parse(
        args.images, args.image_size, args.input_size, args.batch_size, args.workers, args.repeats,
        suffix=args.suffix, matmul_size=args.matmul_size, workdir=args.workdir, profile=args.profile,
    )
    write_json(args.json_path, {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
