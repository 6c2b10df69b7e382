"""Benchmark one full training step (forward, loss, backward, Adam step) per variant.

Baseline and Proposed run in one process, interleaved step block by step
block, on the same synthetic batch: a ``batch_size x 3 x crop x crop`` image
tensor, 8-class masks drawn as face layouts and their top-n labels. Prints
images/s per variant, Proposed's time over Baseline's, and the achieved FLOP/s
(FlopCounterMode on one step) as a fraction of the fp32 matmul rate measured
in the same rounds.

    python3 bench/bench_train.py                      # batch 16, crop 224
    python3 bench/bench_train.py --crop-size 112 --batch-size 8
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
    print_machine,
    print_torch_profile,
    print_ratio,
    print_result,
    synthetic_label_map,
    write_json,
)

from parsing.labels import DEFAULT_MERGE_19_TO_8, DEFAULT_TOP_N  # noqa: E402
from slfer.losses import crop_top_n_labels, slfer_loss  # noqa: E402
from slfer.model import build_model  # noqa: E402
from slfer.variants import model_config_for  # noqa: E402

# Adam settings and loss weights of the SLFER training protocol (lr 1e-4, betas (0.5, 0.999),
# lambda1 = lambda2 = 0.5), so the step does the work a real run does.
LEARNING_RATE = 1e-4
ADAM_BETAS = (0.5, 0.999)
LAMBDA1 = 0.5
LAMBDA2 = 0.5


@dataclass
class TrainCase:
    """A ready-to-run training step and its cost."""

    step: Callable[[], None]
    flops_per_step: int
    images_per_step: int


def synthetic_batch(batch_size: int, crop_size: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Build one normalised image batch with 8-class masks, labels and top-n targets."""
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    merge = np.asarray(DEFAULT_MERGE_19_TO_8, np.uint8)
    masks8 = np.stack([merge[synthetic_label_map(crop_size, rng)] for _ in range(batch_size)])
    masks = torch.from_numpy(masks8).long()  # [B, c, c]
    return {
        "images": torch.randn(batch_size, 3, crop_size, crop_size, generator=generator).to(device),
        "labels": torch.randint(0, 7, (batch_size,), generator=generator).to(device),
        "masks8": masks.to(device),
        "topn": crop_top_n_labels(masks, DEFAULT_TOP_N).float().to(device),  # [B, 8]
    }


def autocast_context(device: str, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype)


def make_train_case(
    variant: str,
    batch_size: int,
    crop_size: int,
    device: str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    steps: int = 1,
    seed: int = 0,
) -> TrainCase:
    """Build a model of ``variant`` with Adam and a case that runs ``steps`` training steps."""
    torch.manual_seed(seed)
    model = build_model(model_config_for(variant)).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, betas=ADAM_BETAS)
    batch = synthetic_batch(batch_size, crop_size, device, seed)
    images = batch["images"].contiguous(memory_format=memory_format)

    def one_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, amp_dtype):
            outputs = model(images)
            loss, _ = slfer_loss(outputs, batch["labels"], batch["masks8"], batch["topn"], LAMBDA1, LAMBDA2)
        loss.backward()
        optimizer.step()

    def run() -> None:
        for _ in range(steps):
            one_step()

    # The counted step also serves as a warm-up; its weight update does not change the cost of later steps.
    flops = count_flops(one_step)
    return TrainCase(step=run, flops_per_step=flops, images_per_step=batch_size * steps)


def make_eval_case(
    variant: str, batch_size: int, crop_size: int, device: str = "cpu", amp_dtype: torch.dtype | None = None,
    channels_last: bool = False, seed: int = 0,
) -> Callable[[], None]:
    """Build a case that runs one test-time forward (backbone + ECT) under inference mode."""
    torch.manual_seed(seed)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(model_config_for(variant)).to(device).to(memory_format=memory_format).eval()
    images = synthetic_batch(batch_size, crop_size, device, seed)["images"].contiguous(memory_format=memory_format)

    def run() -> None:
        with torch.inference_mode(), autocast_context(device, amp_dtype):
            model(images)

    return run


def measure_train(
    variants: list[str],
    batch_size: int,
    crop_size: int,
    steps: int,
    repeats: int,
    device: str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    matmul_size: int = 2048,
    matmul_dtype: torch.dtype = torch.float32,
    with_eval: bool = False,
    profile: bool = False,
) -> dict:
    """Time training steps of ``variants`` (and optionally a test forward), interleaved with a matmul.

    The first variant is the reference of the time ratios. Prints the result
    lines and returns the figures.
    """
    cases = {
        name: make_train_case(name, batch_size, crop_size, device, amp_dtype, channels_last, steps) for name in variants
    }
    matmul_inner = 4
    timed = {name: case.step for name, case in cases.items()}
    if with_eval:
        timed["eval"] = make_eval_case(variants[0], batch_size, crop_size, device, amp_dtype, channels_last)
    timed["matmul"] = matmul_seconds(matmul_size, matmul_dtype, device, matmul_inner)
    seconds = interleave(timed, repeats=repeats, device=device)
    if profile:
        for name in variants:
            print(f"profile of {steps} training steps of {name}:")
            print_torch_profile(cases[name].step)

    dtype_name = str(matmul_dtype).removeprefix("torch.")
    matmul_rate = matmul_flops(matmul_size, matmul_inner) / median(seconds["matmul"])
    print_result(f"matmul_{dtype_name}", matmul_rate / 1e9, "GFLOP/s", f"{matmul_size}^2, " + format_runs(seconds["matmul"]))
    results: dict = {"matmul_flops": matmul_rate, "matmul_dtype": dtype_name, "variants": {}}
    for name, case in cases.items():
        run_seconds = median(seconds[name])
        achieved = case.flops_per_step * steps / run_seconds
        results["variants"][name] = {
            "images_per_s": case.images_per_step / run_seconds,
            "flops_per_image": case.flops_per_step / batch_size,
            "achieved_flops": achieved,
            "fraction_of_matmul": achieved / matmul_rate,
            "seconds": seconds[name],
        }
        print_result(f"train_step_{name}", case.images_per_step / run_seconds, "images/s", format_runs(seconds[name]))
        print_result(f"train_step_{name}_flops", case.flops_per_step / batch_size / 1e9, "GFLOP/image")
        print_result(f"train_step_{name}_achieved", achieved / 1e9, "GFLOP/s")
        print_ratio(f"train_step_{name}_fraction_of_matmul", achieved / matmul_rate)
    if with_eval:
        results["eval_images_per_s"] = batch_size / median(seconds["eval"])
        print_result("eval_forward", results["eval_images_per_s"], "images/s", format_runs(seconds["eval"]))
    reference = variants[0]
    for name in variants[1:]:
        overhead = median(seconds[name]) / median(seconds[reference])
        results["variants"][name]["time_over_reference"] = overhead
        print_ratio(f"train_step_{name}_over_{reference}_time", overhead)
    return results


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16, help="images per step (default 16, the paper's)")
    parser.add_argument("--crop-size", type=int, default=224, help="input side in pixels (default 224)")
    parser.add_argument("--steps", type=int, default=1, help="training steps per timed run (default 1)")
    parser.add_argument(
        "--variants", nargs="+", default=["baseline", "proposed"],
        help="variants to time; the ratios are each variant's step time over the first one's "
        "(default: baseline proposed)",
    )
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the square fp32 matmul (default 2048)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if len(args.variants) < 2:
        parser.error("--variants needs at least two names, the reference first")
    if args.quick:
        args.batch_size, args.crop_size, args.steps, args.repeats, args.matmul_size = 2, 64, 1, 1, 256
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    apply_threads(args.threads)
    machine = print_machine("cpu")
    print(f"config: batch {args.batch_size}, crop {args.crop_size}, {args.steps} steps per run, "
          f"{args.repeats} rounds, variants {' '.join(args.variants)}")
    results = measure_train(
        args.variants, args.batch_size, args.crop_size, args.steps, args.repeats, matmul_size=args.matmul_size,
        profile=args.profile,
    )
    write_json(args.json_path, {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
