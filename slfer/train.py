"""Training loop of SLFER: build, train one epoch, evaluate, checkpoint and resume.

Defaults follow the SLFER paper: Adam with lr 1e-4 and betas (0.5, 0.999), 40 epochs,
batch 16, lr x0.1 after epochs 10, 18, 25 and 32, random 224 crops with horizontal flip
from 256 px images. ``train`` resumes from ``RUN_DIR/checkpoint.pt`` when it exists.
On CPU with a fixed seed a resumed run ends with the same weights and metrics as an
uninterrupted one, because every random draw derives from ``(seed, epoch)`` or from
RNG states stored in the checkpoint.

Data-parallel training: launch with ``torchrun --nproc_per_node K slfer train ...``.
Each process takes every K-th sample of each global batch (``batch_size`` stays the
global batch), gradients are averaged by DistributedDataParallel, and only rank 0
evaluates and writes files. Batch-norm statistics stay per process (no SyncBatchNorm), so
with K processes each normalises over batch_size / K images.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import platform
import resource
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from slfer import __version__
from slfer.atomic import save_torch, write_json, write_text
from slfer.data import (
    Batch,
    BatchLoader,
    SplitTensors,
    check_shardable,
    epoch_batches,
    load_split_tensors,
    random_crop_plans,
)
from slfer.evaluate import (
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    Predictions,
    classification_metrics,
    predict,
    write_evaluation,
)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "slfer-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1

EPOCH_COLUMNS = (
    "epoch",
    "lr",
    "loss",
    "loss_ect",
    "loss_st",
    "loss_ct",
    "train_accuracy",
    "test_accuracy",
    "test_mean_class_accuracy",
    "images_per_s",
    "seconds",
    # CUDA: torch.cuda.max_memory_allocated during the epoch. CPU: peak resident set size
    # of the process so far (getrusage ru_maxrss), so it never decreases between epochs.
    "peak_memory_mib",
)

# Config keys that may change between an interrupted run and its resumption: where
# files live and how many CPU threads run do not change the computation.
RESUME_IGNORED_KEYS = frozenset({"out", "cache", "archive", "workers"})


@dataclass
class TrainConfig:
    """Every setting of a training run; ``config.json`` stores it with the resolved runtime."""

    cache: str
    archive: str | None
    out: str
    variant: str
    seed: int
    backbone_weights: str
    lambda1: float = 0.5
    lambda2: float = 0.5
    top_n: int = 4
    ct_labels: str = "archive"
    epochs: int = 40
    batch_size: int = 16
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)
    milestones: tuple[int, ...] = (10, 18, 25, 32)
    gamma: float = 0.1
    crop_size: int = 224
    device: str = "auto"
    amp: str = "auto"
    channels_last: str = "auto"
    train_split: str = "train"
    test_split: str = "test"
    workers: int = 0

    def __post_init__(self) -> None:
        self.betas = tuple(float(beta) for beta in self.betas)
        self.milestones = tuple(int(epoch) for epoch in self.milestones)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` listing every invalid setting."""
        from slfer.variants import VARIANTS

        problems = []
        if self.variant not in VARIANTS:
            problems.append(f"variant {self.variant!r} is unknown; choose one of {sorted(VARIANTS)}")
        if self.ct_labels not in ("archive", "crop"):
            problems.append(f"ct_labels {self.ct_labels!r} is invalid; choose 'archive' or 'crop'")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            problems.append(f"amp {self.amp!r} is invalid; choose auto, bf16, fp16 or off")
        if self.channels_last not in ("auto", "on", "off"):
            problems.append(f"channels_last {self.channels_last!r} is invalid; choose auto, on or off")
        for name in ("epochs", "batch_size", "crop_size", "top_n"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas):
            problems.append(f"betas must be two values in [0, 1), got {list(self.betas)}")
        if list(self.milestones) != sorted(self.milestones) or any(epoch < 1 for epoch in self.milestones):
            problems.append(f"milestones must be increasing epoch numbers >= 1, got {list(self.milestones)}")
        if not 0.0 < self.gamma <= 1.0:
            problems.append(f"gamma must be in (0, 1], got {self.gamma}")
        if self.lambda1 < 0 or self.lambda2 < 0:
            problems.append(f"lambda1 and lambda2 must be >= 0, got {self.lambda1} and {self.lambda2}")
        if self.workers < 0:
            problems.append(f"workers must be >= 0, got {self.workers}")
        if not problems and self.variant in VARIANTS:
            variant = VARIANTS[self.variant]
            if (variant.st or variant.ct) and not self.archive:
                problems.append(f"variant {self.variant!r} trains on face-part masks, so it needs --archive")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Return the config as JSON-friendly values (tuples become lists)."""
        values = dataclasses.asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}


@dataclass
class Runtime:
    """Device, precision and process layout of a run, resolved from the config and the environment."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    use_grad_scaler: bool
    channels_last: bool
    deterministic: bool
    rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and evaluates (rank 0)."""
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """Return the runtime as JSON-friendly values for ``config.json``."""
        return {
            "device": str(self.device),
            "device_name": (
                torch.cuda.get_device_name(self.device)
                if self.device.type == "cuda"
                else platform.processor() or platform.machine()
            ),
            "autocast_dtype": None if self.autocast_dtype is None else str(self.autocast_dtype).removeprefix("torch."),
            "grad_scaler": self.use_grad_scaler,
            "channels_last": self.channels_last,
            "deterministic": self.deterministic,
            "world_size": self.world_size,
        }


@dataclass
class RunState:
    """Mutable training state that a checkpoint stores."""

    model: torch.nn.Module  # unwrapped model (not the DDP wrapper)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    scaler: torch.amp.GradScaler
    epoch: int = 0  # last completed epoch, 1-based; 0 before training
    history: list[dict[str, Any]] = field(default_factory=list)
    backbone_report: dict[str, Any] = field(default_factory=dict)  # what load_backbone_weights loaded


def resolve_runtime(config: TrainConfig) -> Runtime:
    """Resolve device, mixed precision, memory format and process group from ``config``."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    if config.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {config.device!r} requested, but CUDA is not available; use --device cpu")
        if device.type == "cuda" and world_size > 1:
            device = torch.device(f"cuda:{local_rank}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {config.device!r} is not supported; use auto, cpu or cuda[:index]")

    autocast_dtype = None
    if device.type == "cuda":
        # NOTE: the CUDA branches of this function are unexercised by the CPU test suite.
        if config.amp == "auto":
            autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif config.amp == "bf16":
            autocast_dtype = torch.bfloat16
        elif config.amp == "fp16":
            autocast_dtype = torch.float16
    elif config.amp == "bf16":
        autocast_dtype = torch.bfloat16
    elif config.amp == "fp16":
        raise ValueError("--amp fp16 needs a CUDA device; use --amp bf16 or off on CPU")

    channels_last = config.channels_last == "on" or (config.channels_last == "auto" and device.type == "cuda")
    return Runtime(
        device=device,
        autocast_dtype=autocast_dtype,
        use_grad_scaler=autocast_dtype == torch.float16,
        channels_last=channels_last,
        deterministic=device.type == "cpu",
        rank=rank,
        world_size=world_size,
        distributed=world_size > 1,
    )


def init_process_group(runtime: Runtime) -> None:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) when running distributed."""
    if not runtime.distributed or dist.is_initialized():
        return
    backend = "nccl" if runtime.device.type == "cuda" else "gloo"
    if runtime.device.type == "cuda":
        torch.cuda.set_device(runtime.device)
    dist.init_process_group(backend=backend)
    log.info("rank %d of %d joined the %s process group", runtime.rank, runtime.world_size, backend)


def seed_everything(seed: int, runtime: Runtime) -> None:
    """Seed torch's global RNGs and select deterministic kernels where they are available."""
    torch.manual_seed(seed)
    if runtime.deterministic:
        torch.use_deterministic_algorithms(True)
    else:
        # NOTE: CUDA runs use cuDNN autotuning, so they are not bitwise reproducible.
        torch.backends.cudnn.benchmark = True


def model_config_for(config: TrainConfig, num_expressions: int):
    """Return the ``ModelConfig`` of ``config.variant`` for ``num_expressions`` classes."""
    from slfer import variants

    return variants.model_config_for(config.variant, num_expressions=num_expressions)


def build(config: TrainConfig, runtime: Runtime, num_expressions: int) -> RunState:
    """Build the model (with backbone weights), Adam, the MultiStepLR schedule and the grad scaler."""
    from slfer.model import build_model
    from slfer.pretrained import load_backbone_weights

    model = build_model(model_config_for(config, num_expressions))
    report = load_backbone_weights(model, config.backbone_weights)
    model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)

    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.betas)
    # The scheduler steps once after each epoch, so epoch e (1-based) trains with
    # lr * gamma ** (number of milestones < e): "x0.1 after epoch 10" means epoch 11 uses 1e-5.
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.milestones), gamma=config.gamma)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.use_grad_scaler)
    return RunState(
        model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, backbone_report=report.to_dict()
    )


def resume_key(config: TrainConfig, data_fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Return the settings that must match for a checkpoint to be resumed."""
    values = {key: value for key, value in config.to_dict().items() if key not in RESUME_IGNORED_KEYS}
    values["data"] = data_fingerprint
    return values


def check_resume_compatible(saved: dict[str, Any], current: dict[str, Any], checkpoint_path: Path) -> None:
    """Raise ``ValueError`` naming every setting that differs between a checkpoint and this run."""
    differing = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
    if differing:
        details = "; ".join(f"{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}" for key in differing)
        raise ValueError(
            f"cannot resume from {checkpoint_path}: settings differ ({details}). "
            "Use the original settings, or choose another --out folder for a new run"
        )


def save_checkpoint(path: Path, state: RunState, key: dict[str, Any]) -> None:
    """Write the resume state of ``state`` atomically to ``path``."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "epoch": state.epoch,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "history": state.history,
        "resume_key": key,
    }
    save_torch(path, payload)


def load_checkpoint(path: Path, state: RunState, key: dict[str, Any], runtime: Runtime) -> None:
    """Restore ``state`` (and the global RNG states) from the checkpoint at ``path``."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT or payload.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"{path} is not a version {CHECKPOINT_FORMAT_VERSION} slfer checkpoint; "
            "delete it or choose another --out folder"
        )
    check_resume_compatible(payload["resume_key"], key, path)
    state.model.load_state_dict(payload["model"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scheduler.load_state_dict(payload["scheduler"])
    state.scaler.load_state_dict(payload["scaler"])
    state.epoch = int(payload["epoch"])
    state.history = list(payload["history"])
    torch.set_rng_state(payload["rng_cpu"])
    if runtime.device.type == "cuda" and payload["rng_cuda"]:
        # NOTE: unexercised on CPU; restores the CUDA RNG that head dropout draws from.
        torch.cuda.set_rng_state_all(payload["rng_cuda"])


def peak_memory_mib(device: torch.device) -> float:
    """Return peak memory in MiB: CUDA allocations this epoch, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def component_targets(batch: Batch, config: TrainConfig, has_ct: bool) -> torch.Tensor | None:
    """Return the CT targets [B, 8] float: archive labels, or top-n recomputed on the crop."""
    if not has_ct:
        return None
    if config.ct_labels == "archive":
        return batch.topn
    from slfer.losses import crop_top_n_labels

    return crop_top_n_labels(batch.masks8, config.top_n)


def train_one_epoch(
    model: torch.nn.Module,
    state: RunState,
    loader: BatchLoader,
    config: TrainConfig,
    runtime: Runtime,
    epoch: int,
) -> dict[str, float]:
    """Train ``model`` (possibly DDP-wrapped) for one epoch and return its loss and accuracy means.

    The reported values are averaged over every sample of every process.
    """
    from slfer.losses import slfer_loss
    from slfer.variants import VARIANTS

    variant = VARIANTS[config.variant]
    split = loader.split
    batches = epoch_batches(len(split), config.batch_size, config.seed, epoch)
    plans = random_crop_plans(batches, split.image_size, config.crop_size, config.seed, epoch)
    model.train()

    # Running sums stay on the device so that the loop does not wait for the GPU each step.
    sums = torch.zeros(5, dtype=torch.float64, device=runtime.device)  # loss, ect, st, ct, correct
    seen = 0
    start = time.perf_counter()
    bar = tqdm(
        total=len(batches) * config.batch_size,
        desc=f"epoch {epoch}/{config.epochs}",
        unit="img",
        disable=not runtime.is_main,
        leave=False,
    )
    for step, (indices, plan) in enumerate(zip(batches, plans)):
        indices = indices[runtime.rank :: runtime.world_size]
        batch = loader.load(indices, plan.shard(runtime.rank, runtime.world_size))
        with torch.autocast(
            runtime.device.type, dtype=runtime.autocast_dtype, enabled=runtime.autocast_dtype is not None
        ):
            outputs = model(batch.images)
            total, parts = slfer_loss(
                outputs,
                batch.labels,
                batch.masks8 if variant.st else None,
                component_targets(batch, config, variant.ct),
                config.lambda1,
                config.lambda2,
            )
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(total).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()

        size = indices.shape[0]
        with torch.no_grad():
            sums[0] += total.detach().double() * size
            for slot, name in enumerate(("ect", "st", "ct"), start=1):
                if name in parts and parts[name] is not None:
                    sums[slot] += torch.as_tensor(parts[name]).detach().double() * size
            sums[4] += (outputs["logits"].argmax(dim=1) == batch.labels).sum()
        seen += size
        bar.update(size * runtime.world_size)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{total.item():.4f}")
    bar.close()
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    seconds = time.perf_counter() - start

    counts = torch.tensor([seen], dtype=torch.float64, device=runtime.device)
    if runtime.distributed:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    sums = (sums / counts).tolist()
    total_seen = int(counts.item())
    return {
        "loss": sums[0],
        "loss_ect": sums[1],
        "loss_st": sums[2] if variant.st else None,
        "loss_ct": sums[3] if variant.ct else None,
        "train_accuracy": sums[4],
        "images_per_s": total_seen / seconds,
        "train_seconds": seconds,
    }


def evaluate(model: torch.nn.Module, split: SplitTensors, config: TrainConfig, runtime: Runtime) -> tuple[Predictions, dict]:
    """Predict the centre crops of ``split`` and return the predictions and their metrics."""
    result = predict(
        model,
        split,
        crop_size=config.crop_size,
        batch_size=config.batch_size,
        device=runtime.device,
        autocast_dtype=runtime.autocast_dtype,
        channels_last=runtime.channels_last,
        progress=runtime.is_main,
    )
    return result, classification_metrics(result.labels, result.predictions, list(split.expressions))


def write_epochs_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """Write one row per completed epoch with the columns of ``EPOCH_COLUMNS``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=EPOCH_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in EPOCH_COLUMNS})
    write_text(path, buffer.getvalue())


def model_record(state: RunState, config: TrainConfig, runtime: Runtime, train: SplitTensors) -> dict[str, Any]:
    """Return the ``model.pt`` payload: weights and plain-typed settings, loadable with weights_only=True."""
    return {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "state_dict": {key: value.detach().cpu() for key, value in state.model.state_dict().items()},
        "model_config": state.model.config.to_dict(),
        "class_names": list(train.expressions),
        "coarse_names": None if train.coarse_names is None else list(train.coarse_names),
        "image_size": train.image_size,
        "crop_size": config.crop_size,
        "batch_size": config.batch_size,
        "autocast_dtype": runtime.describe()["autocast_dtype"],
        "variant": config.variant,
        "seed": config.seed,
        "dataset": train.dataset,
        "epochs": state.epoch,
        "train_config": config.to_dict(),
        "package_version": __version__,
        "torch_version": str(torch.__version__),
    }


def best_epoch_on_test(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the epoch with the highest test accuracy, labelled as not the reported figure."""
    best = max(history, key=lambda row: row["test_accuracy"])  # first maximum wins
    return {
        "epoch": best["epoch"],
        "accuracy": best["test_accuracy"],
        "note": "not the reported figure: choosing an epoch on the test set overstates accuracy; "
        "the reported accuracy is that of the final epoch",
    }


def write_final_outputs(
    out_dir: Path,
    state: RunState,
    config: TrainConfig,
    runtime: Runtime,
    train: SplitTensors,
    test: SplitTensors,
    result: Predictions,
) -> dict[str, Any]:
    """Write model.pt, predictions.csv, features.npz and, last of all, metrics.json."""
    save_torch(out_dir / "model.pt", model_record(state, config, runtime, train))
    extra = {
        "num_train_images": len(train),
        "epochs": state.epoch,
        "dataset": train.dataset,
        "variant": config.variant,
        "seed": config.seed,
        "split": config.test_split,
        "best_epoch_on_test": best_epoch_on_test(state.history),
    }
    return write_evaluation(out_dir, result, list(test.expressions), extra)


def resolved_config(
    config: TrainConfig,
    runtime: Runtime,
    train: SplitTensors,
    test: SplitTensors,
    model_config: dict,
    backbone_report: dict,
) -> dict[str, Any]:
    """Return the ``config.json`` payload: settings, runtime, data provenance and versions."""
    return {
        **config.to_dict(),
        "runtime": runtime.describe(),
        "model_config": model_config,
        "backbone_weights_report": backbone_report,
        "data": {
            "dataset": train.dataset,
            "num_train_images": len(train),
            "num_test_images": len(test),
            "image_size": train.image_size,
            "class_names": list(train.expressions),
            "coarse_names": None if train.coarse_names is None else list(train.coarse_names),
            "attrs": _plain(train.attrs),
        },
        "package_version": __version__,
        "torch_version": str(torch.__version__),
        "python_version": platform.python_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _plain(value: Any) -> Any:
    """Convert HDF5 attribute values (numpy scalars and arrays, bytes, nested dicts) to JSON types."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# Archive attributes that identify the masks a run trains on (the parser and the merge).
ARCHIVE_IDENTITY_KEYS = (
    "parser_backend",
    "weights_sha256",
    "labels_source",
    "parser_input_size",
    "parser_precision",
    "merge_19_to_8",
)


def data_fingerprint(split: SplitTensors) -> dict[str, Any]:
    """Return what identifies the training data: the cache's image list and the mask provenance."""
    cache_attrs = split.attrs.get("cache", {})
    archive_attrs = split.attrs.get("archive", {})
    return {
        "image_list_hash": _plain(cache_attrs.get("image_list_hash")),
        "archive": {key: _plain(archive_attrs.get(key)) for key in ARCHIVE_IDENTITY_KEYS if key in archive_attrs},
    }


def load_data(config: TrainConfig, runtime: Runtime) -> tuple[SplitTensors, SplitTensors]:
    """Load the training split (with masks) and the test split (images only) into RAM."""
    pin = runtime.device.type == "cuda"
    train = load_split_tensors(config.cache, config.archive, config.train_split, top_n=config.top_n, pin_memory=pin)
    test = load_split_tensors(config.cache, None, config.test_split, pin_memory=pin)
    if train.expressions != test.expressions:
        raise ValueError(
            f"splits {config.train_split!r} and {config.test_split!r} of {config.cache} list different classes"
        )
    return train, test


def train(
    config: TrainConfig,
    stop_after: int | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any] | None:
    """Train (or resume) the run of ``config`` in ``config.out`` and return its final metrics.

    ``stop_after`` ends the process after that epoch with its checkpoint written, for
    splitting a run over several jobs; the call then returns ``None``. ``on_epoch_end``
    is called on rank 0 with the epoch number and its CSV row after each checkpoint.
    """
    from slfer.variants import VARIANTS

    runtime = resolve_runtime(config)
    init_process_group(runtime)
    check_shardable(config.batch_size, runtime.world_size)
    if config.workers > 0:
        torch.set_num_threads(config.workers)
    seed_everything(config.seed, runtime)
    out_dir = Path(config.out)
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    log.info("run %s: variant %s, seed %d, runtime %s", out_dir, config.variant, config.seed, runtime.describe())

    train_split, test_split = load_data(config, runtime)
    variant = VARIANTS[config.variant]
    loader = BatchLoader(
        train_split,
        runtime.device,
        config.crop_size,
        with_masks=variant.st or (variant.ct and config.ct_labels == "crop"),
        with_topn=variant.ct and config.ct_labels == "archive",
        channels_last=runtime.channels_last,
    )
    state = build(config, runtime, num_expressions=len(train_split.expressions))
    key = resume_key(config, data_fingerprint(train_split))

    checkpoint_path = out_dir / "checkpoint.pt"
    if checkpoint_path.exists():
        load_checkpoint(checkpoint_path, state, key, runtime)
        log.info("resuming from %s after epoch %d of %d", checkpoint_path, state.epoch, config.epochs)
    if runtime.is_main:
        write_json(
            out_dir / "config.json",
            resolved_config(
                config, runtime, train_split, test_split, state.model.config.to_dict(), state.backbone_report
            ),
        )

    model: torch.nn.Module = state.model
    if runtime.distributed:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(state.model, device_ids=device_ids)

    last_result: Predictions | None = None
    for epoch in range(state.epoch + 1, config.epochs + 1):
        if runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(runtime.device)
        lr = state.optimizer.param_groups[0]["lr"]
        epoch_start = time.perf_counter()
        row: dict[str, Any] = {"epoch": epoch, "lr": lr}
        row.update(train_one_epoch(model, state, loader, config, runtime, epoch))
        state.scheduler.step()
        state.epoch = epoch

        if runtime.is_main:
            last_result, metrics = evaluate(state.model, test_split, config, runtime)
            row["test_accuracy"] = metrics["accuracy"]
            row["test_mean_class_accuracy"] = metrics["mean_class_accuracy"]
            row["seconds"] = time.perf_counter() - epoch_start
            row["peak_memory_mib"] = peak_memory_mib(runtime.device)
            state.history.append(row)
            save_checkpoint(checkpoint_path, state, key)
            write_epochs_csv(out_dir / "epochs.csv", state.history)
            log.info(
                "epoch %d/%d: lr %.2e, loss %.4f, train accuracy %.4f, test accuracy %.4f, %.1f images/s",
                epoch,
                config.epochs,
                lr,
                row["loss"],
                row["train_accuracy"],
                row["test_accuracy"],
                row["images_per_s"],
            )
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
        if runtime.distributed:
            dist.barrier()
        if stop_after is not None and epoch >= stop_after and epoch < config.epochs:
            log.info("stopping after epoch %d as requested; rerun the same command to resume", epoch)
            return None

    final_metrics = None
    if runtime.is_main:
        if last_result is None:
            # The checkpoint already held the last epoch (a run stopped while writing outputs).
            last_result, _ = evaluate(state.model, test_split, config, runtime)
            write_epochs_csv(out_dir / "epochs.csv", state.history)
        final_metrics = write_final_outputs(out_dir, state, config, runtime, train_split, test_split, last_result)
        # A finished run keeps no resume state: the same command run again (for example
        # by `snakemake --force` on this run) trains afresh instead of resuming a run
        # that has nothing left to do. model.pt contains the final weights.
        checkpoint_path.unlink()
        log.info(
            "finished %s: final-epoch test accuracy %.4f, mean class accuracy %.4f",
            out_dir,
            final_metrics["accuracy"],
            final_metrics["mean_class_accuracy"],
        )
    if runtime.distributed:
        dist.barrier()
    return final_metrics
