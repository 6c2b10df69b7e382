"""Face-parser backends that turn cached images into 19-class masks, and the parse loop.

Two backends share the ``MaskParser`` interface:

- ``bisenet``: facexlib's pretrained BiSeNet, run in batches on the GPU when one is available;
- ``labels``: ready-made 19-class label maps read from PNG files (for synthetic data, or masks
  produced elsewhere).

``parse_cache`` streams the images of an image cache through a backend and writes a mask
archive (see ``parsing.archive``), optionally for one contiguous shard of the cache.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from parsing.archive import ArchiveSettings, CacheInfo, read_cache_info, shard_range, write_archive
from parsing.labels import FACE_PARTS_19
from parsing.weights import build_bisenet

logger = logging.getLogger(__name__)

# The BiSeNet authors' demo (zllrunning/face-parsing.PyTorch, test.py) resizes faces to 512x512
# and normalises them with the ImageNet mean and std. Smaller sizes are for tests and previews.
BISENET_INPUT_SIZE = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKENDS = ("bisenet", "labels")
PRECISIONS = ("auto", "fp32", "fp16")


class MaskParser(abc.ABC):
    """A source of 19-class face-part masks (class ids as in ``parsing.labels.FACE_PARTS_19``)."""

    backend: str
    # Whether the DataLoader should pin host memory for faster copies to the device.
    pin_memory: bool = False

    @abc.abstractmethod
    def parse_batch(self, images: np.ndarray | torch.Tensor, names: Sequence[str]) -> np.ndarray:
        """Return masks uint8 [B, H, W] for RGB images uint8 [B, H, W, 3] named ``names``."""

    @abc.abstractmethod
    def provenance(self) -> dict[str, Any]:
        """Return the archive attributes that describe this parser.

        Keys: parser_backend, weights_sha256, labels_source, parser_input_size, parser_precision.
        """


# ---------------------------------------------------------------------------------------------
# BiSeNet


def resolve_device(device: str) -> torch.device:
    """Resolve "auto" to cuda when available, else cpu, and check that an explicit device exists."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"invalid device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested, but CUDA is not available; use --device cpu or auto")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """Resolve "auto" to fp16 on CUDA and fp32 elsewhere, and reject fp16 on other devices."""
    if precision not in PRECISIONS:
        raise ValueError(f"invalid precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"fp16 parsing needs a CUDA device, got {device}; use --precision fp32")
    return precision


def preprocess_batch(images: torch.Tensor, input_size: int) -> torch.Tensor:
    """Turn RGB images uint8 [B, H, W, 3] into BiSeNet input float32 [B, 3, I, I] on their device.

    The resize is bilinear with pixel-centre sampling (``align_corners=False``) and antialiasing.
    When enlarging (the default case, 256-pixel cache images to 512), it equals
    ``cv2.resize(..., interpolation=cv2.INTER_LINEAR)`` and PIL's ``Image.BILINEAR``. When
    shrinking, it follows PIL, which the BiSeNet authors' demo (zllrunning/face-parsing.PyTorch,
    test.py) uses, because OpenCV's INTER_LINEAR skips antialiasing there. It runs on floats, so
    the uint8 rounding of OpenCV and PIL (up to one grey level) does not happen.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected RGB images uint8 [B, H, W, 3], got {images.dtype} {list(images.shape)}")
    batch = images.permute(0, 3, 1, 2).float()  # [B, 3, H, W]
    if batch.shape[-2:] != (input_size, input_size):
        batch = F.interpolate(
            batch, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True
        )
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1)
    return (batch / 255.0 - mean) / std


def resize_labels_nearest(labels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize label maps [B, h, w] (any integer dtype) to [B, height, width] by nearest neighbour.

    "nearest-exact" samples at pixel centres, as ``resize_label_map`` does for label files.
    """
    if labels.shape[-2:] == (height, width):
        return labels
    resized = F.interpolate(labels[:, None].float(), size=(height, width), mode="nearest-exact")
    return resized[:, 0].to(labels.dtype)


class BiSeNetParser(MaskParser):
    """facexlib's BiSeNet(num_class=19) with strictly loaded pretrained weights."""

    backend = "bisenet"

    def __init__(
        self,
        weights: str | os.PathLike,
        input_size: int = BISENET_INPUT_SIZE,
        device: str = "auto",
        precision: str = "auto",
        channels_last: bool = True,
    ):
        if input_size < 32 or input_size % 32:
            raise ValueError(
                f"input size must be a positive multiple of 32 (BiSeNet downsamples 32x), got {input_size}"
            )
        if input_size != BISENET_INPUT_SIZE:
            logger.warning(
                "BiSeNet input size %d differs from the %d of the BiSeNet authors' demo", input_size, BISENET_INPUT_SIZE
            )
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.input_size = input_size
        self.channels_last = channels_last
        self.pin_memory = self.device.type == "cuda"
        model, self.weights_sha256 = build_bisenet(weights)
        model = model.to(self.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()
        logger.info(
            "BiSeNet on %s, %s, input %dx%d, channels_last=%s",
            self.device, self.precision, input_size, input_size, channels_last,
        )  # fmt: skip

    @torch.inference_mode()
    def parse_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Return masks uint8 [B, H, W] (on the CPU) for RGB images uint8 [B, H, W, 3]."""
        height, width = images.shape[1:3]
        batch = preprocess_batch(images.to(self.device, non_blocking=True), self.input_size)  # [B, 3, I, I]
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        # NOTE: the CUDA path (fp16 autocast, pinned host memory) has not been run in this project's tests.
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.precision == "fp16"):
            # forward returns (out, out16, out32), each upsampled to the input size. out is the
            # parsing result, and out16 and out32 are auxiliary training heads.
            logits = self.model(batch)[0]  # [B, 19, I, I]
        labels = logits.argmax(dim=1).to(torch.uint8)  # [B, I, I]
        return resize_labels_nearest(labels, height, width).cpu()

    def parse_batch(self, images: np.ndarray | torch.Tensor, names: Sequence[str] = ()) -> np.ndarray:
        return self.parse_tensor(torch.as_tensor(images)).numpy()

    def provenance(self) -> dict[str, Any]:
        return {
            "parser_backend": self.backend,
            "weights_sha256": self.weights_sha256,
            "labels_source": "",
            "parser_input_size": self.input_size,
            "parser_precision": self.precision,
        }


# ---------------------------------------------------------------------------------------------
# Ready-made label maps


def resize_label_map(label_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a label map [h, w] to [height, width] by nearest neighbour at pixel centres."""
    source_height, source_width = label_map.shape
    rows = np.minimum(((np.arange(height) + 0.5) * source_height / height).astype(np.int64), source_height - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * source_width / width).astype(np.int64), source_width - 1)
    return label_map[rows[:, None], cols[None, :]]


class LabelMapParser(MaskParser):
    """Reads 19-class label maps from ``root/<image name with its suffix replaced by .png>``.

    Each file must be a single-channel 8-bit PNG (mode L, or P whose indices are the class ids)
    with values 0..18. A map whose size differs from the image's is resized by nearest neighbour.
    """

    backend = "labels"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"label map folder not found: {self.root}")

    def label_path(self, name: str) -> Path:
        return self.root / PurePosixPath(name).with_suffix(".png")

    def read_label_map(self, name: str, height: int, width: int) -> np.ndarray:
        """Return the label map of image ``name`` as uint8 [height, width]."""
        path = self.label_path(name)
        if not path.is_file():
            raise FileNotFoundError(f"label map not found: {path} (expected for image {name!r})")
        try:
            with Image.open(path) as image:
                mode = image.mode
                label_map = np.asarray(image)
        except (OSError, SyntaxError) as error:
            raise ValueError(f"cannot read label map {path}: {error}") from error
        if mode not in ("L", "P"):
            raise ValueError(f"label map {path} has PIL mode {mode}; expected a single-channel 8-bit PNG (mode L or P)")
        if label_map.size and int(label_map.max()) >= len(FACE_PARTS_19):
            raise ValueError(
                f"label map {path} contains class id {int(label_map.max())}, "
                f"but 19-class maps use 0..{len(FACE_PARTS_19) - 1}"
            )
        if label_map.shape != (height, width):
            label_map = resize_label_map(label_map, height, width)
        return label_map.astype(np.uint8)

    def parse_batch(self, images: np.ndarray | torch.Tensor, names: Sequence[str]) -> np.ndarray:
        height, width = images.shape[1:3]
        if len(names) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(names)} names")
        return np.stack([self.read_label_map(name, height, width) for name in names])

    def provenance(self) -> dict[str, Any]:
        # NOTE: the label files are identified by folder only, not hashed; the masks themselves
        # are stored in the archive.
        return {
            "parser_backend": self.backend,
            "weights_sha256": "",
            "labels_source": f"label maps from folder {self.root} (path: folder/<image name with suffix .png>)",
            "parser_input_size": 0,
            "parser_precision": "",
        }


def build_mask_parser(
    backend: str,
    *,
    weights: str | os.PathLike | None = None,
    labels_root: str | os.PathLike | None = None,
    input_size: int = BISENET_INPUT_SIZE,
    device: str = "auto",
    precision: str = "auto",
) -> MaskParser:
    """Create the backend named ``backend`` ("bisenet" needs ``weights``, "labels" needs ``labels_root``)."""
    if backend == "bisenet":
        if weights is None:
            raise ValueError("the bisenet backend needs --weights")
        return BiSeNetParser(weights, input_size=input_size, device=device, precision=precision)
    if backend == "labels":
        if labels_root is None:
            raise ValueError("the labels backend needs --labels-root")
        return LabelMapParser(labels_root)
    raise ValueError(f"unknown parser backend {backend!r}: choose one of {', '.join(BACKENDS)}")


# ---------------------------------------------------------------------------------------------
# Parse loop


class CacheBlocks(Dataset):
    """Blocks of consecutive images of an image cache, for a DataLoader with ``batch_size=None``.

    Item i holds images start + i*block .. start + (i+1)*block (the last block may be shorter).
    Each DataLoader worker opens the HDF5 file on first use, because an h5py handle must not be
    shared across processes.
    """

    def __init__(self, cache: CacheInfo, start: int, stop: int, block: int):
        self.path = cache.path
        self.names = cache.names
        self.start, self.stop, self.block = start, stop, block
        self._file: h5py.File | None = None

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.block)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        first = self.start + index * self.block
        last = min(first + self.block, self.stop)
        return {
            "start": first,
            "images": torch.from_numpy(self._file["images"][first:last]),  # uint8 [B, S, S, 3]
            "names": self.names[first:last],
        }

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def iter_masks(
    parser: MaskParser, cache: CacheInfo, start: int, stop: int, batch_size: int = 16, workers: int = 2
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first cache index, masks19 uint8 [B, S, S])`` for cache images start..stop, in order.

    ``workers`` DataLoader processes read batches from the cache while the parser runs. They start
    when this function is called, before the caller opens its output file, so that no forked
    worker inherits an HDF5 file that is open for writing.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be 0 or more, got {workers}")
    blocks = CacheBlocks(cache, start, stop, batch_size)
    loader = DataLoader(
        blocks,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=parser.pin_memory,
        prefetch_factor=2 if workers else None,
    )
    return _parse_batches(parser, iter(loader), blocks, stop - start)


def _parse_batches(
    parser: MaskParser, batches: Iterator[dict[str, Any]], blocks: CacheBlocks, total: int
) -> Iterator[tuple[int, np.ndarray]]:
    try:
        with tqdm(total=total, desc=f"parse ({parser.backend})", unit="img") as progress:
            for item in batches:
                masks = parser.parse_batch(item["images"], item["names"])
                yield item["start"], masks
                progress.update(len(masks))
    finally:
        blocks.close()


def parse_cache(
    cache_path: str | os.PathLike,
    out_path: str | os.PathLike,
    parser: MaskParser,
    settings: ArchiveSettings | None = None,
    shard: tuple[int, int] | None = None,
    batch_size: int = 16,
    workers: int = 2,
) -> Path:
    """Parse the images of a cache (or of shard i of k) and write the mask archive ``out_path``."""
    settings = settings or ArchiveSettings()
    cache = read_cache_info(cache_path)
    start, stop = shard_range(cache.num_images, *shard) if shard else (0, cache.num_images)
    logger.info(
        "parsing images %d..%d of %s (%d images%s) with the %s backend",
        start, stop, cache.path, stop - start, f", shard {shard[0]}/{shard[1]}" if shard else "", parser.backend,
    )  # fmt: skip
    # closing() stops the DataLoader workers at once when writing fails midway.
    with contextlib.closing(iter_masks(parser, cache, start, stop, batch_size=batch_size, workers=workers)) as blocks:
        return write_archive(out_path, cache, start, stop, parser.provenance(), settings, blocks, shard=shard)
