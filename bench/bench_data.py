"""Benchmark the training data path: the project's in-RAM batch loader against a file loader.

Project side: ``slfer.data`` keeps the image cache and the mask archive in RAM
as uint8 tensors and crops 224 px, flips and normalises a whole batch with one
gather (images and masks together). Reference side: the straightforward
ImageFolder-style loader. Its torch ``Dataset`` opens each JPEG and its
8-class mask PNG with PIL per sample. It applies torchvision's functional
transforms jointly to both (Resize 256, RandomCrop 224, RandomHorizontalFlip)
and then ToTensor and Normalize, behind a ``DataLoader`` with batch 16.

Both sides read the same generated images: files of ``--image-size`` px
(100 px by default, the size of RAF-DB's aligned faces) for the reference
loader, and a 256 px cache built from those files for the project loader. The
cache build and the load into RAM are one-off costs per dataset or per run, so
they are timed and printed apart from the per-epoch rate.

    python3 bench/bench_data.py                 # 1024 images, 3 rounds
    python3 bench/bench_data.py --images 4096 --workers 4
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
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_common_arguments,
    apply_threads,
    format_runs,
    interleave,
    median,
    print_cprofile,
    print_machine,
    print_ratio,
    print_result,
    write_dataset,
    write_json,
)

from parsing.labels import DEFAULT_MERGE_19_TO_8  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageMaskFolder(Dataset):
    """Image and mask files decoded per sample, with joint Resize + RandomCrop + flip."""

    def __init__(self, samples: list[tuple[Path, Path, int]], resize: int, crop_size: int) -> None:
        self.samples = samples
        self.resize = resize
        self.crop_size = crop_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image_path, mask_path, label = self.samples[index]
        image = Image.open(image_path).convert("RGB")
        mask = Image.open(mask_path)
        image = TF.resize(image, self.resize)
        mask = TF.resize(mask, self.resize, interpolation=transforms.InterpolationMode.NEAREST)
        top, left, height, width = transforms.RandomCrop.get_params(image, (self.crop_size, self.crop_size))
        image = TF.crop(image, top, left, height, width)
        mask = TF.crop(mask, top, left, height, width)
        if torch.rand(1).item() < 0.5:
            image = TF.hflip(image)
            mask = TF.hflip(mask)
        image_tensor = TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)  # float32 [3, c, c]
        mask_tensor = torch.from_numpy(np.asarray(mask, dtype=np.int64))  # int64 [c, c]
        return image_tensor, mask_tensor, label


def write_coarse_masks(labels19_root: Path, masks8_root: Path) -> dict[str, Path]:
    """Merge every 19-class label PNG into an 8-class mask PNG; return masks by image stem path."""
    merge = np.asarray(DEFAULT_MERGE_19_TO_8, np.uint8)
    masks = {}
    for path in sorted(labels19_root.rglob("*.png")):
        relative = path.relative_to(labels19_root)
        target = masks8_root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        fine = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if fine is None:
            raise OSError(f"cv2.imread failed for {path}")
        if not cv2.imwrite(str(target), merge[fine]):
            raise OSError(f"cv2.imwrite failed for {target}")
        masks[relative.with_suffix("").as_posix()] = target
    return masks


def build_project_inputs(image_root: Path, labels19_root: Path, work: Path, cache_size: int) -> tuple[Path, Path, float]:
    """Build the image cache and a labels-backend mask archive; return their paths and the cache build time."""
    from parsing.cache import build_cache
    from parsing.cli import main as parse_cli
    from parsing.datasets import read_dataset

    cache = work / "cache.h5"
    archive = work / "masks.h5"
    start = time.perf_counter()
    listing = read_dataset("folder", image_root)
    build_cache(listing, cache, "bench", size=cache_size)
    cache_seconds = time.perf_counter() - start
    status = parse_cli([
        "parse", "--cache", str(cache), "--out", str(archive), "--backend", "labels",
        "--labels-root", str(labels19_root),
    ])
    if status not in (0, None):
        raise RuntimeError(f"slfer-parse parse --backend labels exited with status {status}")
    return cache, archive, cache_seconds


def time_call(run, repeats: int = 10) -> float:
    """Return the median milliseconds of ``run`` over ``repeats`` calls after one warm-up call."""
    run()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1000)
    return median(samples)


def print_stage_breakdown(cache: Path, archive: Path, batch_size: int, crop_size: int) -> None:
    """Time each stage of ``BatchLoader.load`` on one batch, beside an equivalent way to do it.

    The equivalents produce identical tensors (checked here). The crop rows compare the
    gather that ``slfer.data`` uses on CUDA with the slicing it uses on the CPU.
    """
    from slfer.data import CropPlan, gather_crop, load_split_tensors, normalise_images, slice_crop

    split = load_split_tensors(cache, archive, "train")
    generator = torch.Generator().manual_seed(0)
    indices = torch.randperm(len(split), generator=generator)[:batch_size]
    offsets = split.image_size - crop_size + 1
    plan = CropPlan(
        top=torch.randint(0, offsets, (batch_size,), generator=generator),
        left=torch.randint(0, offsets, (batch_size,), generator=generator),
        flip=torch.rand(batch_size, generator=generator) < 0.5,
    )
    images = split.images.index_select(0, indices)  # uint8 [B, S, S, 3]
    masks = split.masks8.index_select(0, indices)  # uint8 [B, S, S]
    flat_images = split.images.view(len(split), -1)  # uint8 [N, S*S*3], same storage

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    cropped = slice_crop(images, plan, crop_size)

    def two_step_normalise(batch: torch.Tensor) -> torch.Tensor:
        return ((batch.permute(0, 3, 1, 2).float() / 255.0 - mean) / std).contiguous()

    assert torch.equal(flat_images.index_select(0, indices).view_as(images), images)
    assert torch.equal(gather_crop(images, plan, crop_size), cropped)
    assert torch.equal(gather_crop(masks, plan, crop_size), slice_crop(masks, plan, crop_size))
    assert torch.allclose(two_step_normalise(cropped), normalise_images(cropped), atol=1e-5)
    stages = [
        ("gather images", lambda: split.images.index_select(0, indices),
         "index_select on [N, S*S*3]", lambda: flat_images.index_select(0, indices)),
        ("crop+flip images (CPU: slice)", lambda: slice_crop(images, plan, crop_size),
         "gather (CUDA path)", lambda: gather_crop(images, plan, crop_size)),
        ("crop+flip masks (CPU: slice)", lambda: slice_crop(masks, plan, crop_size),
         "gather (CUDA path)", lambda: gather_crop(masks, plan, crop_size)),
        ("normalise (uint8 permute, in-place scale and shift)", lambda: normalise_images(cropped),
         "subtract, divide", lambda: two_step_normalise(cropped)),
    ]
    print(f"profile stages of BatchLoader.load, batch {batch_size}, {torch.get_num_threads()} threads "
          "(median ms; project function | equivalent):")
    for name, project_run, alternative_name, alternative_run in stages:
        print(f"profile stage {name}: {time_call(project_run):.3f} ms | {alternative_name}: "
              f"{time_call(alternative_run):.3f} ms")


def project_epoch_case(cache: Path, archive: Path, batch_size: int, crop_size: int, device: str = "cpu"):
    """Load the split into RAM once; return (case running one epoch, load seconds, image count)."""
    from slfer.data import BatchLoader, epoch_batches, load_split_tensors, random_crop_plans

    start = time.perf_counter()
    split = load_split_tensors(cache, archive, "train", pin_memory=device.startswith("cuda"))
    load_seconds = time.perf_counter() - start
    loader = BatchLoader(split, torch.device(device), crop_size, with_masks=True, with_topn=True)
    epoch = [0]

    def run() -> None:
        epoch[0] += 1
        batches = epoch_batches(len(split), batch_size, seed=0, epoch=epoch[0])
        plans = random_crop_plans(batches, split.image_size, crop_size, seed=0, epoch=epoch[0])
        for indices, plan in zip(batches, plans):
            batch = loader.load(indices, plan)
            assert batch.masks8 is not None
            assert batch.images.shape[-1] == crop_size, batch.images.shape

    images_per_epoch = (len(split) // batch_size) * batch_size
    return run, load_seconds, images_per_epoch


def reference_epoch_case(
    samples: list[tuple[Path, Path, int]], batch_size: int, crop_size: int, resize: int, workers: int,
    device: str = "cpu",
):
    """Return (case running one epoch of the file loader, images per epoch)."""
    dataset = ImageMaskFolder(samples, resize=resize, crop_size=crop_size)
    on_cuda = device.startswith("cuda")
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True, pin_memory=on_cuda
    )

    def run() -> None:
        for images, masks, _ in loader:
            # The training step needs the batch on its device, as the project loader delivers it.
            images = images.to(device, non_blocking=on_cuda)
            masks = masks.to(device, non_blocking=on_cuda)
            assert images.shape[-1] == crop_size, images.shape
            assert masks.shape[-1] == crop_size, masks.shape

    return run, (len(samples) // batch_size) * batch_size


def measure_data(
    images: int,
    image_size: int,
    cache_size: int,
    crop_size: int,
    batch_size: int,
    workers: int,
    repeats: int,
    device: str = "cpu",
    workdir: Path | None = None,
    profile: bool = False,
) -> dict:
    """Time one epoch of both loaders, interleaved; print the result lines and return the figures."""
    work = Path(tempfile.mkdtemp(prefix="bench_data_")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        image_paths = write_dataset(work / "images", images, image_size, label_maps_root=work / "labels19")
        masks8 = write_coarse_masks(work / "labels19", work / "masks8")
        samples = []
        for index, path in enumerate(image_paths):
            key = path.relative_to(work / "images").with_suffix("").as_posix()
            samples.append((path, masks8[key], index % 7))

        cache, archive, cache_seconds = build_project_inputs(work / "images", work / "labels19", work, cache_size)
        project_run, load_seconds, project_images = project_epoch_case(cache, archive, batch_size, crop_size, device)
        reference_run, reference_images = reference_epoch_case(
            samples, batch_size, crop_size, cache_size, workers, device
        )
        seconds = interleave({"reference": reference_run, "project": project_run}, repeats=repeats, device=device)
        if profile:
            print_cprofile(project_run)
            print_stage_breakdown(cache, archive, batch_size, crop_size)
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    reference_rate = reference_images / median(seconds["reference"])
    project_rate = project_images / median(seconds["project"])
    print_result("cache_build", images / cache_seconds, "images/s", f"{cache_seconds:.2f} s once per dataset")
    print_result("load_into_ram", images / load_seconds, "images/s", f"{load_seconds:.2f} s once per run")
    print_result("data_reference", reference_rate, "images/s", format_runs(seconds["reference"]))
    print_result("data_project", project_rate, "images/s", format_runs(seconds["project"]))
    print_ratio("data_project_over_reference", project_rate / reference_rate)
    return {
        "cache_build_seconds": cache_seconds,
        "load_seconds": load_seconds,
        "reference_images_per_s": reference_rate,
        "project_images_per_s": project_rate,
        "ratio": project_rate / reference_rate,
        "seconds": seconds,
    }


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1024, help="number of generated images (default 1024)")
    parser.add_argument(
        "--image-size", type=int, default=100,
        help="side of the generated image files in pixels (default 100, as RAF-DB's aligned faces)",
    )
    parser.add_argument("--cache-size", type=int, default=256, help="side of the cached images (default 256)")
    parser.add_argument("--crop-size", type=int, default=224, help="training crop side (default 224)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size on both sides (default 16)")
    parser.add_argument(
        "--workers", type=int, default=2,
        help="DataLoader worker processes of the file loader, and torch threads of the project loader "
        "(which runs in the training process and uses no worker processes) (default 2)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="folder for generated files (default: a temporary one)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats, args.workers = 32, 1, 0
        args.cache_size, args.crop_size, args.batch_size = 64, 56, 8
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    apply_threads(args.threads if args.threads is not None else max(1, args.workers))
    machine = print_machine("cpu")
    print(f"config: {args.images} images of {args.image_size} px, cache {args.cache_size} px, crop {args.crop_size}, "
          f"batch {args.batch_size}, {args.workers} workers, {args.repeats} rounds")
    results = measure_data(
        args.images, args.image_size, args.cache_size, args.crop_size, args.batch_size, args.workers, args.repeats,
        workdir=args.workdir, profile=args.profile,
    )
    write_json(args.json_path, {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
