"""In-memory training data: split loading, seeded batch order and on-device augmentation.

A whole split lives in RAM as uint8 tensors (RAF-DB train at 256 px is about 2.4 GB of
images plus 0.8 GB of masks). Each step gathers one batch, moves it to the training
device and crops, flips and normalises it there, so no loader worker processes are needed.

Every random choice of an epoch (the batch order, the crop offsets and the flips) comes
from ``torch.Generator`` objects seeded from ``(seed, epoch)`` only. A run resumed at
epoch ``k`` therefore sees exactly the batches and crops that an uninterrupted run sees.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from parsing.archive import load_split

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Salts that keep the batch-order and augmentation streams of one epoch independent.
_ORDER_STREAM = 0
_AUGMENT_STREAM = 1


@dataclass
class SplitTensors:
    """One split of a dataset held in RAM as tensors."""

    images: torch.Tensor  # uint8 [N, S, S, 3] RGB, pinned on CUDA hosts
    labels: torch.Tensor  # int64 [N], canonical expression ids
    names: list[str]
    expressions: tuple[str, ...]
    dataset: str
    image_size: int
    masks8: torch.Tensor | None = None  # uint8 [N, S, S] coarse part ids, or None without archive
    topn: torch.Tensor | None = None  # uint8 [N, 8] multi-hot top-n labels over the whole mask
    coarse_names: tuple[str, ...] | None = None
    top_n: int | None = None
    attrs: dict = field(default_factory=dict)  # {"cache": {...}, "archive": {...}} provenance attributes

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_split_tensors(
    cache_path: str | Path,
    archive_path: str | Path | None,
    split: str,
    top_n: int | None = None,
    pin_memory: bool = False,
) -> SplitTensors:
    """Load ``split`` of an image cache (and its mask archive) into RAM as tensors.

    Raises ``ValueError`` (from ``load_split``) when the split contains no images, so that a
    misspelt split name fails here rather than as an empty epoch.
    """
    data = load_split(cache_path, archive_path=archive_path, split=split, top_n=top_n)
    images = torch.from_numpy(np.ascontiguousarray(data.images))
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(
            f"image cache {cache_path} has images of dtype {images.dtype} and shape "
            f"{tuple(images.shape)}; expected uint8 [N, S, S, 3]"
        )
    masks8 = None if data.masks8 is None else torch.from_numpy(np.ascontiguousarray(data.masks8))
    topn = None if data.topn is None else torch.from_numpy(np.ascontiguousarray(data.topn))
    if pin_memory:
        # Pinned pages let the per-batch host-to-device copies run asynchronously.
        images = images.pin_memory()
        masks8 = None if masks8 is None else masks8.pin_memory()
    tensors = SplitTensors(
        images=images,
        labels=torch.as_tensor(np.asarray(data.labels), dtype=torch.int64),
        names=list(data.names),
        expressions=tuple(data.expressions),
        dataset=str(data.dataset),
        image_size=int(images.shape[1]),
        masks8=masks8,
        topn=topn,
        coarse_names=None if data.coarse_names is None else tuple(data.coarse_names),
        top_n=data.top_n,
        attrs=dict(data.attrs),
    )
    log.info(
        "loaded split %r of %s: %d images at %d px%s",
        split,
        tensors.dataset,
        len(tensors),
        tensors.image_size,
        "" if masks8 is None else " with 8-class masks",
    )
    return tensors


def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """Return a CPU generator whose state depends only on ``(seed, epoch, stream)``."""
    generator = torch.Generator()
    # A fixed odd multiplier spreads nearby (seed, epoch) pairs far apart in the seed space.
    generator.manual_seed((seed * 1_000_003 + epoch * 4 + stream) % (2**63))
    return generator


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Return the global training batches of ``epoch`` as int64 index tensors [batch_size].

    The order is a fresh permutation per epoch. The last incomplete batch is dropped
    (``drop_last``): because the permutation changes every epoch, each image is left
    out in some epochs only, and no step trains on a tiny batch whose batch-norm statistics
    would be noise.
    """
    if num_items < batch_size:
        raise ValueError(
            f"the training split has {num_items} images, fewer than one batch of {batch_size}; "
            "lower --batch-size"
        )
    order = torch.randperm(num_items, generator=epoch_generator(seed, epoch, _ORDER_STREAM))
    num_batches = num_items // batch_size
    return list(order[: num_batches * batch_size].view(num_batches, batch_size).unbind(0))


def check_shardable(batch_size: int, world_size: int) -> None:
    """Raise ``ValueError`` unless the global batch splits evenly over ``world_size`` processes."""
    if batch_size % world_size != 0:
        raise ValueError(
            f"batch size {batch_size} is not a multiple of the number of processes {world_size}; "
            "the batch size is global, so choose one that divides evenly"
        )


@dataclass
class CropPlan:
    """Per-sample crop offsets and flips for one batch."""

    top: torch.Tensor  # int64 [B]
    left: torch.Tensor  # int64 [B]
    flip: torch.Tensor  # bool [B]

    def shard(self, rank: int, world_size: int) -> CropPlan:
        """Return the plan of the samples that process ``rank`` takes (every ``world_size``-th)."""
        return CropPlan(
            top=self.top[rank::world_size], left=self.left[rank::world_size], flip=self.flip[rank::world_size]
        )


def random_crop_plans(
    batches: list[torch.Tensor], image_size: int, crop_size: int, seed: int, epoch: int
) -> list[CropPlan]:
    """Draw a random crop offset and flip for every sample of every batch of an epoch.

    The draws depend on ``(seed, epoch)`` and the batch sizes only.
    """
    check_crop_size(image_size, crop_size)
    generator = epoch_generator(seed, epoch, _AUGMENT_STREAM)
    plans = []
    for batch in batches:
        size = batch.shape[0]
        top = torch.randint(0, image_size - crop_size + 1, (size,), generator=generator)
        left = torch.randint(0, image_size - crop_size + 1, (size,), generator=generator)
        flip = torch.rand(size, generator=generator) < 0.5
        plans.append(CropPlan(top=top, left=left, flip=flip))
    return plans


def centre_crop_plan(batch_size: int, image_size: int, crop_size: int) -> CropPlan:
    """Return the plan of a centre crop without flip for ``batch_size`` samples."""
    check_crop_size(image_size, crop_size)
    offset = (image_size - crop_size) // 2
    return CropPlan(
        top=torch.full((batch_size,), offset, dtype=torch.int64),
        left=torch.full((batch_size,), offset, dtype=torch.int64),
        flip=torch.zeros(batch_size, dtype=torch.bool),
    )


def check_crop_size(image_size: int, crop_size: int) -> None:
    """Raise ``ValueError`` unless ``0 < crop_size <= image_size``."""
    if not 0 < crop_size <= image_size:
        raise ValueError(
            f"crop size {crop_size} px does not fit images of {image_size} px; "
            "choose a crop size no larger than the cache's image size"
        )


def crop_index_grids(plan: CropPlan, crop_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return row and column source indices [B, c] that realise ``plan``.

    A flipped sample reads its columns right to left, which mirrors the crop.
    """
    steps = torch.arange(crop_size, device=plan.top.device)
    rows = plan.top[:, None] + steps[None, :]
    forward_columns = plan.left[:, None] + steps[None, :]
    mirrored_columns = plan.left[:, None] + (crop_size - 1 - steps)[None, :]
    columns = torch.where(plan.flip[:, None], mirrored_columns, forward_columns)
    return rows, columns


def gather_crop(tensor: torch.Tensor, plan: CropPlan, crop_size: int) -> torch.Tensor:
    """Crop (and mirror) a batch [B, S, S, ...] with one advanced-indexing gather."""
    rows, columns = crop_index_grids(plan, crop_size)
    batch_index = torch.arange(tensor.shape[0], device=tensor.device)[:, None, None]
    return tensor[batch_index, rows[:, :, None], columns[:, None, :]]


def slice_crop(
    tensor: torch.Tensor, plan: CropPlan, crop_size: int, indices: torch.Tensor | None = None
) -> torch.Tensor:
    """Crop (and mirror) samples of [N, S, S, ...] by slicing each one, then stacking.

    With ``indices`` [B], the crops come straight from those samples of ``tensor``, so the
    full-size images are never copied. Without them, ``tensor`` is the batch itself.
    """
    rows = range(tensor.shape[0]) if indices is None else indices.tolist()
    crops = []
    for row, top, left, flip in zip(rows, plan.top.tolist(), plan.left.tolist(), plan.flip.tolist()):
        crop = tensor[row, top : top + crop_size, left : left + crop_size]
        crops.append(crop.flip(1) if flip else crop)
    return torch.stack(crops)


def apply_crop(tensor: torch.Tensor, plan: CropPlan, crop_size: int) -> torch.Tensor:
    """Crop (and mirror) a batch [B, S, S, ...] per ``plan``; returns [B, c, c, ...].

    Images and masks cropped with the same plan stay aligned pixel for pixel. On CUDA
    the gather serves the whole batch in one kernel. On the CPU the gather costs about
    40 times more than slicing (``bench/bench_data.py --profile``), so the CPU slices.
    Both give identical tensors.
    """
    if tensor.device.type == "cuda":
        return gather_crop(tensor, plan, crop_size)
    return slice_crop(tensor, plan, crop_size)


def normalise_images(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """Convert uint8 [B, H, W, 3] RGB to ImageNet-normalised float32 [B, 3, H, W].

    The layout change happens on the uint8 batch, which has a quarter of the float
    batch's bytes. Then ``(x / 255 - mean) / std`` runs as two in-place passes,
    ``x * scale + shift``, on contiguous memory. This measured 3 to 9 times faster on
    the CPU than normalising the strided float view (``bench/bench_data.py --profile``).
    """
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    # permute() of a contiguous NHWC batch is already a channels_last NCHW view.
    normalised = images.permute(0, 3, 1, 2).contiguous(memory_format=memory_format).float()
    return normalised.mul_(1.0 / (255.0 * std)).add_(-mean / std)


@dataclass
class Batch:
    """One batch on the training device."""

    images: torch.Tensor  # float32 [B, 3, c, c], ImageNet-normalised
    labels: torch.Tensor  # int64 [B]
    indices: torch.Tensor  # int64 [B], positions in the split (CPU)
    masks8: torch.Tensor | None = None  # int64 [B, c, c], cropped like the images
    topn: torch.Tensor | None = None  # float32 [B, 8], whole-image top-n labels


class BatchLoader:
    """Build cropped, flipped and normalised batches of a ``SplitTensors`` on a device.

    On CUDA the full-size batch is gathered into one of two pinned staging buffers,
    copied asynchronously and cropped on the GPU. An event per buffer keeps the host
    from overwriting a buffer whose copy is still in flight. On other devices the host
    slices the crops directly out of the split.
    """

    def __init__(
        self,
        split: SplitTensors,
        device: torch.device,
        crop_size: int,
        with_masks: bool,
        with_topn: bool,
        channels_last: bool = False,
    ) -> None:
        check_crop_size(split.image_size, crop_size)
        if with_masks and split.masks8 is None:
            raise ValueError("this variant needs 8-class masks, but no mask archive was loaded")
        if with_topn and split.topn is None:
            raise ValueError("this variant needs top-n labels, but no mask archive was loaded")
        self.split = split
        self.device = device
        self.crop_size = crop_size
        self.with_masks = with_masks
        self.with_topn = with_topn
        self.channels_last = channels_last
        self.staged = device.type == "cuda"
        self._buffers: dict[tuple[str, int, int], torch.Tensor] = {}
        self._events: dict[int, torch.cuda.Event] = {}
        self._slot = 0

    def _to_device(self, source: torch.Tensor, indices: torch.Tensor, key: str) -> torch.Tensor:
        # NOTE: the pinned double-buffer path runs on CUDA only and is unexercised by the
        # CPU test suite.
        slot = self._slot
        shape = (indices.shape[0], *source.shape[1:])
        buffer_key = (key, slot, indices.shape[0])
        buffer = self._buffers.get(buffer_key)
        if buffer is None:
            buffer = torch.empty(shape, dtype=source.dtype).pin_memory()
            self._buffers[buffer_key] = buffer
        event = self._events.get(slot)
        if event is not None:
            event.synchronize()
        torch.index_select(source, 0, indices, out=buffer)
        return buffer.to(self.device, non_blocking=True)

    def load(self, indices: torch.Tensor, plan: CropPlan) -> Batch:
        """Gather ``indices``, crop and flip them per ``plan`` and normalise the images."""
        if self.staged:
            cropped_images, masks = self._load_staged(indices, plan)
        else:
            # Crop on the host straight from the split, so the full-size images are never
            # copied, and move only the uint8 crops (a no-op when training on the CPU).
            cropped_images = slice_crop(self.split.images, plan, self.crop_size, indices).to(self.device)
            masks = None
            if self.with_masks:
                masks = slice_crop(self.split.masks8, plan, self.crop_size, indices).to(self.device)
        batch = Batch(
            images=normalise_images(cropped_images, self.channels_last),  # from uint8 [B, c, c, 3]
            labels=self.split.labels.index_select(0, indices).to(self.device),
            indices=indices,
        )
        if masks is not None:
            batch.masks8 = masks.long()  # int64 [B, c, c]
        if self.with_topn:
            batch.topn = self.split.topn.index_select(0, indices).to(self.device).float()
        return batch

    def _load_staged(self, indices: torch.Tensor, plan: CropPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Copy the full-size samples to the GPU through pinned buffers and crop them there."""
        images = self._to_device(self.split.images, indices, "images")
        masks = None
        if self.with_masks:
            masks = self._to_device(self.split.masks8, indices, "masks8")
        event = torch.cuda.Event()
        event.record()
        self._events[self._slot] = event
        self._slot = 1 - self._slot

        plan_on_device = CropPlan(
            top=plan.top.to(self.device), left=plan.left.to(self.device), flip=plan.flip.to(self.device)
        )
        cropped_images = gather_crop(images, plan_on_device, self.crop_size)
        cropped_masks = None if masks is None else gather_crop(masks, plan_on_device, self.crop_size)
        return cropped_images, cropped_masks
