"""Mask archives: the HDF5 files that store face-parsing results beside an image cache.

An archive stores, for every image of one image cache and in the same order:

- ``/masks19`` uint8 [N, S, S]: the parser's 19-class map (``parsing.labels.FACE_PARTS_19``),
- ``/masks8`` uint8 [N, S, S]: the same map merged into 8 coarse classes,
- ``/counts19`` int32 [N, 19] and ``/counts8`` int32 [N, 8]: pixel counts over the whole mask,
- ``/topn`` uint8 [N, 8]: multi-hot labels of the ``top_n`` largest coarse classes,
- ``/names``, ``/labels``, ``/split``: copied from the cache so that a reader can check them,

plus root attributes that record the parser, its weights and the settings. Archives hold no
pickles and no object data other than variable-length UTF-8 strings, so plain h5py reads them.
The image cache itself (licensed face images) never goes into an archive.

``load_split`` is the reader that stage 2 (``slfer``) uses: it joins a cache split with its
archive after checking that both describe the same images.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

import parsing
from parsing.atomic import atomic_output
from parsing.cache import CacheFormatError, image_list_hash, open_cache, read_cache_index
from parsing.labels import DEFAULT_MERGE_19_TO_8, DEFAULT_TOP_N, EXPRESSIONS, FACE_PARTS_8, FACE_PARTS_19

logger = logging.getLogger(__name__)

ARCHIVE_FORMAT = "slfer-mask-archive"
ARCHIVE_FORMAT_VERSION = 1
PARSER_BACKENDS = ("bisenet", "labels")
NUM_FINE = len(FACE_PARTS_19)
NUM_COARSE = len(FACE_PARTS_8)

# Attributes that may differ between archives holding the same data: the write time, and the
# shard position on shard files only. Everything else must agree for shards to merge.
VOLATILE_ATTRS = ("created", "shard")

# Images per block when copying or recomputing masks, so that RAM use stays bounded
# (256 masks of 256x256 pixels are 16 MiB).
_BLOCK_IMAGES = 256
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_STRING_DTYPE = h5py.string_dtype("utf-8")


class ArchiveMismatchError(ValueError):
    """Raised when a mask archive does not match its image cache or the requested settings.

    ``differences`` lists every problem found, one sentence each.
    """

    def __init__(self, archive_path: str | os.PathLike, differences: Sequence[str]):
        self.archive_path = Path(archive_path)
        self.differences = list(differences)
        listing = "\n  - ".join(self.differences)
        super().__init__(f"mask archive {self.archive_path} does not match:\n  - {listing}")


@dataclass(frozen=True)
class ArchiveSettings:
    """Settings that turn 19-class masks into the stored 8-class masks and top-n labels."""

    merge_19_to_8: tuple[int, ...] = DEFAULT_MERGE_19_TO_8
    top_n: int = DEFAULT_TOP_N

    def __post_init__(self) -> None:
        object.__setattr__(self, "merge_19_to_8", validate_merge_table(self.merge_19_to_8))
        if isinstance(self.top_n, bool) or not isinstance(self.top_n, (int, np.integer)):
            raise ValueError(f"top_n must be an integer, got {self.top_n!r}")
        if not 0 <= int(self.top_n) <= NUM_COARSE:
            raise ValueError(f"top_n must be between 0 and {NUM_COARSE}, got {self.top_n}")
        object.__setattr__(self, "top_n", int(self.top_n))


@dataclass(frozen=True)
class CacheInfo:
    """Index of an image cache: everything except the pixels."""

    path: Path
    names: list[str]
    labels: np.ndarray  # int64 [N], canonical expression ids
    split: list[str]
    attrs: dict[str, Any]
    image_size: int

    @property
    def num_images(self) -> int:
        return len(self.names)


@dataclass
class SplitData:
    """One split of an image cache, joined with its mask archive when one is given."""

    images: np.ndarray  # uint8 [N, S, S, 3] RGB
    labels: np.ndarray  # int64 [N]
    masks8: np.ndarray | None  # uint8 [N, S, S]
    topn: np.ndarray | None  # uint8 [N, 8]
    counts8: np.ndarray | None  # int32 [N, 8]
    names: list[str]
    expressions: tuple[str, ...]
    coarse_names: tuple[str, ...]
    dataset: str
    top_n: int | None
    attrs: dict[str, dict[str, Any]]  # {"cache": {...}, "archive": {...}}, "archive" only with an archive
    split: str
    indices: np.ndarray  # int64 [N], positions of these images in the cache


# ---------------------------------------------------------------------------------------------
# Label arithmetic


def validate_merge_table(table: Sequence[int]) -> tuple[int, ...]:
    """Return ``table`` as a tuple after checking that it maps each of the 19 fine classes to 0..7."""
    values = tuple(table)
    if len(values) != NUM_FINE:
        raise ValueError(f"the 19 -> 8 merge table must have {NUM_FINE} entries, got {len(values)}: {list(values)}")
    for fine, coarse in enumerate(values):
        if isinstance(coarse, bool) or not isinstance(coarse, (int, np.integer)) or not 0 <= coarse < NUM_COARSE:
            raise ValueError(
                f"merge table entry {fine} ({FACE_PARTS_19[fine]}) must be a coarse class id 0..{NUM_COARSE - 1}, "
                f"got {coarse!r}"
            )
    values = tuple(int(v) for v in values)
    unused = [FACE_PARTS_8[c] for c in range(NUM_COARSE) if c not in values]
    if unused:
        logger.warning("merge table maps no fine class to coarse class(es) %s", ", ".join(unused))
    return values


def parse_merge_table(text: str) -> tuple[int, ...]:
    """Parse a merge table written as 19 comma-separated integers."""
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        raise ValueError(f"invalid merge table {text!r}: expected {NUM_FINE} comma-separated integers") from None
    return validate_merge_table(values)


def merge_masks(masks19: np.ndarray, table: Sequence[int]) -> np.ndarray:
    """Map 19-class masks (uint8, any shape) to coarse classes with ``table``."""
    lookup = np.asarray(validate_merge_table(table), dtype=np.uint8)
    if masks19.size and int(masks19.max()) >= NUM_FINE:
        raise ValueError(f"19-class masks contain class id {int(masks19.max())}, expected 0..{NUM_FINE - 1}")
    return lookup[masks19]


def class_counts(masks: np.ndarray, num_classes: int) -> np.ndarray:
    """Count the pixels of each class per mask: uint8 [B, H, W] -> int32 [B, num_classes]."""
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape [B, H, W], got {masks.shape}")
    batch = masks.shape[0]
    flat = masks.reshape(batch, -1).astype(np.int64)
    if flat.size and int(flat.max()) >= num_classes:
        raise ValueError(f"masks contain class id {int(flat.max())}, expected 0..{num_classes - 1}")
    # One bincount over all images: image b's classes are shifted into [b*C, (b+1)*C).
    offsets = np.arange(batch, dtype=np.int64)[:, None] * num_classes
    counts = np.bincount((flat + offsets).ravel(), minlength=batch * num_classes)
    return counts.reshape(batch, num_classes).astype(np.int32)


def merge_counts(counts19: np.ndarray, table: Sequence[int]) -> np.ndarray:
    """Sum fine-class pixel counts into coarse classes: int [..., 19] -> int32 [..., 8]."""
    membership = np.zeros((NUM_FINE, NUM_COARSE), dtype=np.int64)
    membership[np.arange(NUM_FINE), validate_merge_table(table)] = 1
    return (np.asarray(counts19, dtype=np.int64) @ membership).astype(np.int32)


def top_n_labels(counts: np.ndarray, n: int) -> np.ndarray:
    """Mark the ``n`` classes with the most pixels: counts [..., C] -> multi-hot uint8 [..., C].

    Classes are ordered by count, largest first, with ties broken by the lower class id. The
    first ``n`` are marked, then every class with a zero count is unmarked again, so an image
    with fewer than ``n`` present classes gets fewer than ``n`` labels.
    """
    counts = np.asarray(counts)
    if counts.ndim < 1 or counts.shape[-1] == 0:
        raise ValueError(f"counts must have a class axis, got shape {counts.shape}")
    if np.issubdtype(counts.dtype, np.integer):
        keys = counts.astype(np.int64)
    elif np.issubdtype(counts.dtype, np.floating):
        keys = counts.astype(np.float64)
    else:
        raise ValueError(f"counts must be numeric, got dtype {counts.dtype}")
    if (keys < 0).any():
        raise ValueError("counts must not be negative")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")

    # A stable sort of the negated counts keeps equal counts in class-id order.
    order = np.argsort(-keys, axis=-1, kind="stable")
    rank = np.empty_like(order)
    class_ids = np.broadcast_to(np.arange(counts.shape[-1]), order.shape)
    np.put_along_axis(rank, order, class_ids, axis=-1)
    return ((rank < n) & (keys > 0)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Small helpers


def _plain(value: Any) -> Any:
    """Convert an HDF5 attribute value to a plain Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def read_attrs(node: h5py.HLObject) -> dict[str, Any]:
    """Return the attributes of an HDF5 object as a dict of plain Python values."""
    return {key: _plain(value) for key, value in node.attrs.items()}


def open_archive(path: str | os.PathLike) -> h5py.File:
    """Open a mask archive read-only, raising FileNotFoundError or ValueError with the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask archive not found: {path} (write it with `slfer-parse parse`)")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise ValueError(f"{path} is not a readable HDF5 file ({error})") from error


def _json_attr(attrs: dict[str, Any], key: str, problems: list[str]) -> Any:
    try:
        return json.loads(attrs[key])
    except KeyError:
        problems.append(f"attribute '{key}' is missing")
    except (TypeError, json.JSONDecodeError):
        problems.append(f"attribute '{key}' is not valid JSON: {attrs[key]!r}")
    return None


def _read_strings(dataset: h5py.Dataset) -> list[str]:
    return [str(item) for item in dataset.asstr()[...]]


def _read_rows(dataset: h5py.Dataset, indices: np.ndarray) -> np.ndarray:
    """Read the rows ``indices`` (sorted, unique) of ``dataset`` with one read per contiguous run."""
    out = np.empty((len(indices),) + dataset.shape[1:], dtype=dataset.dtype)
    if len(indices) == 0:
        return out
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    position = 0
    for run in np.split(indices, breaks):
        first, length = int(run[0]), len(run)
        dataset.read_direct(out, np.s_[first : first + length], np.s_[position : position + length])
        position += length
    return out


def utc_timestamp() -> str:
    """Return the current time as ISO 8601 UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Image cache index


def read_cache_info(cache_path: str | os.PathLike) -> CacheInfo:
    """Read the index of an image cache (names, labels, splits, attributes) without its pixels.

    Raises ``parsing.cache.CacheFormatError`` (a ValueError) when the file is not a consistent
    version 1 image cache, naming what is wrong.
    """
    path = Path(cache_path)
    if not path.is_file():
        raise FileNotFoundError(f"image cache not found: {path} (build it with `slfer-parse cache`)")
    index = read_cache_index(path)
    size = index.attrs["image_size"]
    with open_cache(path) as handle:
        images = handle["images"]
        if images.dtype != np.uint8 or images.shape[1:] != (size, size, 3):
            raise CacheFormatError(
                f"{path}: /images is {images.dtype} {images.shape}, expected uint8 [N, {size}, {size}, 3]"
            )
    return CacheInfo(
        path=path, names=index.names, labels=index.labels, split=index.split, attrs=index.attrs, image_size=int(size)
    )


# ---------------------------------------------------------------------------------------------
# Writing


def archive_attrs(
    cache: CacheInfo, provenance: dict[str, Any], settings: ArchiveSettings, shard: tuple[int, int] | None
) -> dict[str, Any]:
    """Build the root attributes of a new archive from the cache, the parser provenance and settings."""
    attrs = {
        "format": ARCHIVE_FORMAT,
        "format_version": ARCHIVE_FORMAT_VERSION,
        "dataset": cache.attrs["dataset"],
        "image_list_hash": cache.attrs["image_list_hash"],
        "parser_backend": provenance["parser_backend"],
        "weights_sha256": provenance["weights_sha256"],
        "labels_source": provenance["labels_source"],
        "parser_input_size": int(provenance["parser_input_size"]),
        "parser_precision": provenance["parser_precision"],
        "mask_size": cache.image_size,
        "merge_19_to_8": json.dumps(list(settings.merge_19_to_8)),
        "fine_names": json.dumps(list(FACE_PARTS_19)),
        "coarse_names": json.dumps(list(FACE_PARTS_8)),
        "top_n": settings.top_n,
        "package_version": parsing.__version__,
        "created": utc_timestamp(),
    }
    if "source_hash" in cache.attrs:
        attrs["source_hash"] = cache.attrs["source_hash"]
    if shard is not None:
        attrs["shard"] = f"{shard[0]}/{shard[1]}"
    return attrs


class _ArchiveWriter:
    """Creates the datasets of an open archive file and fills them block by block."""

    def __init__(self, file: h5py.File, num_images: int, mask_size: int, settings: ArchiveSettings):
        self.file = file
        self.settings = settings
        self.mask_size = mask_size
        mask_options = {"chunks": (1, mask_size, mask_size), "compression": "gzip"} if num_images else {}
        for key in ("masks19", "masks8"):
            file.create_dataset(key, shape=(num_images, mask_size, mask_size), dtype=np.uint8, **mask_options)
        file.create_dataset("counts19", shape=(num_images, NUM_FINE), dtype=np.int32)
        file.create_dataset("counts8", shape=(num_images, NUM_COARSE), dtype=np.int32)
        file.create_dataset("topn", shape=(num_images, NUM_COARSE), dtype=np.uint8)

    def write_masks19(self, start: int, masks19: np.ndarray) -> None:
        """Store 19-class masks uint8 [B, S, S] at rows start..start+B, with everything derived from them."""
        if masks19.dtype != np.uint8 or masks19.shape[1:] != (self.mask_size, self.mask_size):
            raise ValueError(
                f"parser returned masks {masks19.dtype} {masks19.shape}, "
                f"expected uint8 [B, {self.mask_size}, {self.mask_size}]"
            )
        stop = start + masks19.shape[0]
        counts19 = class_counts(masks19, NUM_FINE)
        self.file["masks19"][start:stop] = masks19
        self.file["counts19"][start:stop] = counts19
        self.write_derived(start, masks19, counts19)

    def write_derived(self, start: int, masks19: np.ndarray, counts19: np.ndarray) -> None:
        """Store the 8-class masks, counts and top-n labels that follow from 19-class masks."""
        stop = start + masks19.shape[0]
        counts8 = merge_counts(counts19, self.settings.merge_19_to_8)
        self.file["masks8"][start:stop] = merge_masks(masks19, self.settings.merge_19_to_8)
        self.file["counts8"][start:stop] = counts8
        self.file["topn"][start:stop] = top_n_labels(counts8, self.settings.top_n)


def _write_index(file: h5py.File, names: Sequence[str], labels: np.ndarray, split: Sequence[str]) -> None:
    file.create_dataset("names", data=np.asarray(names, dtype=object), dtype=_STRING_DTYPE)
    file.create_dataset("labels", data=np.asarray(labels, dtype=np.int16))
    file.create_dataset("split", data=np.asarray(split, dtype=object), dtype=_STRING_DTYPE)


def write_archive(
    out_path: str | os.PathLike,
    cache: CacheInfo,
    start: int,
    stop: int,
    provenance: dict[str, Any],
    settings: ArchiveSettings,
    mask_blocks: Iterable[tuple[int, np.ndarray]],
    shard: tuple[int, int] | None = None,
) -> Path:
    """Write an archive for cache images start..stop from ``mask_blocks``.

    ``mask_blocks`` yields ``(first cache index, masks19 uint8 [B, S, S])`` in order and must cover
    start..stop exactly. The file appears at ``out_path`` only after the last block is written.
    """
    out_path = Path(out_path)
    num_images = stop - start
    with atomic_output(out_path) as temp_path:
        with h5py.File(temp_path, "w") as file:
            writer = _ArchiveWriter(file, num_images, cache.image_size, settings)
            _write_index(file, cache.names[start:stop], cache.labels[start:stop], cache.split[start:stop])
            expected = start
            for first, masks19 in mask_blocks:
                if first != expected or first + len(masks19) > stop:
                    raise RuntimeError(
                        f"mask block for images {first}..{first + len(masks19)} is out of order; "
                        f"expected it to start at {expected} and end by {stop}"
                    )
                writer.write_masks19(first - start, masks19)
                expected = first + len(masks19)
            if expected != stop:
                raise RuntimeError(f"parser stopped after image {expected}, expected masks up to {stop}")
            file.attrs.update(archive_attrs(cache, provenance, settings, shard))
    logger.info("wrote mask archive %s (%d images)", out_path, num_images)
    return out_path


# ---------------------------------------------------------------------------------------------
# Checking an archive


def _expected_datasets(count: int, size: int) -> dict[str, tuple[np.dtype | None, tuple[int, ...]]]:
    """Return the dtype (None for variable-length UTF-8 strings) and shape of every dataset."""
    return {
        "masks19": (np.dtype(np.uint8), (count, size, size)),
        "masks8": (np.dtype(np.uint8), (count, size, size)),
        "counts19": (np.dtype(np.int32), (count, NUM_FINE)),
        "counts8": (np.dtype(np.int32), (count, NUM_COARSE)),
        "topn": (np.dtype(np.uint8), (count, NUM_COARSE)),
        "names": (None, (count,)),
        "labels": (np.dtype(np.int16), (count,)),
        "split": (None, (count,)),
    }


def _attribute_problems(attrs: dict[str, Any]) -> list[str]:
    """List what is wrong with the root attributes of a version 1 archive (provenance sanity)."""
    required = (
        "dataset", "image_list_hash", "parser_backend", "weights_sha256", "labels_source", "parser_input_size",
        "parser_precision", "mask_size", "merge_19_to_8", "fine_names", "coarse_names", "top_n",
        "package_version", "created",
    )  # fmt: skip
    missing = [key for key in required if key not in attrs]
    if missing:
        return [f"attribute(s) missing: {', '.join(missing)}"]

    problems: list[str] = []
    backend = attrs["parser_backend"]
    if backend not in PARSER_BACKENDS:
        problems.append(f"parser_backend is {backend!r}, expected one of {', '.join(PARSER_BACKENDS)}")
    elif backend == "bisenet":
        if not _SHA256_PATTERN.fullmatch(str(attrs["weights_sha256"])):
            problems.append(f"weights_sha256 {attrs['weights_sha256']!r} is not a sha256 hex digest")
        if not isinstance(attrs["parser_input_size"], int) or attrs["parser_input_size"] <= 0:
            problems.append(f"parser_input_size is {attrs['parser_input_size']!r}, expected a positive size")
    elif attrs["weights_sha256"] != "" or attrs["parser_input_size"] != 0 or not attrs["labels_source"]:
        problems.append(
            "a labels-backend archive must have empty weights_sha256, parser_input_size 0 and a labels_source"
        )

    table = _json_attr(attrs, "merge_19_to_8", problems)
    if table is not None:
        try:
            validate_merge_table(table)
        except ValueError as error:
            problems.append(str(error))
    fine_names = _json_attr(attrs, "fine_names", problems)
    if fine_names is not None and tuple(fine_names) != FACE_PARTS_19:
        problems.append(f"fine_names {fine_names} differ from the BiSeNet class order {list(FACE_PARTS_19)}")
    coarse_names = _json_attr(attrs, "coarse_names", problems)
    if coarse_names is not None and tuple(coarse_names) != FACE_PARTS_8:
        problems.append(f"coarse_names {coarse_names} differ from {list(FACE_PARTS_8)}")
    top_n = attrs["top_n"]
    if not isinstance(top_n, int) or not 0 <= top_n <= NUM_COARSE:
        problems.append(f"top_n is {top_n!r}, expected an integer 0..{NUM_COARSE}")
    size = attrs["mask_size"]
    if not isinstance(size, int) or size <= 0:
        problems.append(f"mask_size is {size!r}, expected a positive integer")
    return problems


def _dataset_problems(archive: h5py.File, size: int) -> list[str]:
    """List missing, unexpected and mistyped datasets: the archive must contain exactly the expected ones."""
    problems = []
    count = archive["names"].shape[0] if isinstance(archive.get("names"), h5py.Dataset) else 0
    expected = _expected_datasets(count, size)
    for key in archive:
        if key not in expected:
            problems.append(f"unexpected object '/{key}'")
    for key, (dtype, shape) in expected.items():
        node = archive.get(key)
        if not isinstance(node, h5py.Dataset):
            problems.append(f"dataset '/{key}' is missing")
            continue
        if dtype is None:
            string_info = h5py.check_string_dtype(node.dtype)
            dtype_ok = string_info is not None and string_info.encoding == "utf-8" and string_info.length is None
            expected_dtype = "variable-length UTF-8 strings"
        else:
            dtype_ok = node.dtype == dtype
            expected_dtype = str(dtype)
        if not dtype_ok:
            problems.append(f"/{key} has dtype {node.dtype}, expected {expected_dtype}")
        if node.shape != shape:
            problems.append(f"/{key} has shape {list(node.shape)}, expected {list(shape)}")
    return problems


def archive_format_problems(archive: h5py.File) -> list[str]:
    """List what makes ``archive`` an invalid version 1 mask archive, on its own (no cache needed)."""
    attrs = read_attrs(archive)
    if "format" not in attrs:
        return [
            f"not a mask archive: the file has no 'format' attribute (expected {ARCHIVE_FORMAT!r}); "
            "give an archive written by `slfer-parse parse`, `merge` or `derive`"
        ]
    if attrs["format"] != ARCHIVE_FORMAT:
        return [f"format is {attrs['format']!r}, expected {ARCHIVE_FORMAT!r}"]
    if attrs.get("format_version") != ARCHIVE_FORMAT_VERSION:
        return [
            f"format_version is {attrs.get('format_version')!r}, this reader supports {ARCHIVE_FORMAT_VERSION}"
        ]
    problems = _attribute_problems(attrs)
    if problems:
        return problems
    return _dataset_problems(archive, attrs["mask_size"])


def _describe_list_difference(what: str, archive_items: Sequence, cache_items: Sequence) -> str | None:
    if len(archive_items) != len(cache_items):
        return f"{what}: archive has {len(archive_items)} entries, cache has {len(cache_items)}"
    differing = [i for i, (a, c) in enumerate(zip(archive_items, cache_items)) if a != c]
    if not differing:
        return None
    first = differing[0]
    return (
        f"{len(differing)} {what} differ; first at index {first}: "
        f"archive {archive_items[first]!r} vs cache {cache_items[first]!r}"
    )


def archive_cache_problems(archive: h5py.File, cache: CacheInfo) -> list[str]:
    """List every difference between an archive and the image cache it should describe."""
    problems = archive_format_problems(archive)
    if problems:
        return problems
    attrs = read_attrs(archive)
    if "shard" in attrs:
        problems.append(
            f"archive is shard {attrs['shard']} of a sharded run; merge the shards with `slfer-parse merge`"
        )
    if attrs["dataset"] != cache.attrs["dataset"]:
        problems.append(f"dataset: archive {attrs['dataset']!r} vs cache {cache.attrs['dataset']!r}")
    if attrs["image_list_hash"] != cache.attrs["image_list_hash"]:
        problems.append(
            f"image_list_hash: archive {attrs['image_list_hash']} vs cache {cache.attrs['image_list_hash']}"
        )
    if attrs["mask_size"] != cache.image_size:
        problems.append(f"mask size {attrs['mask_size']} differs from the cache image size {cache.image_size}")
    # Names and labels can coincide across different image files (two renderings of a
    # synthetic set, a re-aligned release); the source hash covers the files' bytes.
    archive_source, cache_source = attrs.get("source_hash"), cache.attrs.get("source_hash")
    if archive_source and cache_source and archive_source != cache_source:
        problems.append(
            f"source_hash: archive {archive_source} vs cache {cache_source}; the archive was parsed "
            "from other image files than the ones this cache was built from"
        )

    names = _read_strings(archive["names"])
    split = _read_strings(archive["split"])
    labels = archive["labels"][...].tolist()
    for what, archive_items, cache_items in (
        ("names", names, cache.names),
        ("labels", labels, cache.labels.tolist()),
        ("splits", split, cache.split),
    ):
        difference = _describe_list_difference(what, archive_items, cache_items)
        if difference:
            problems.append(difference)
    return problems


def content_problems(archive: h5py.File) -> list[str]:
    """Recompute masks8, counts and top-n from masks19 and list the datasets that disagree.

    Reads every mask, so it takes a while on a full dataset.
    """
    attrs = read_attrs(archive)
    table = json.loads(attrs["merge_19_to_8"])
    count = archive["masks19"].shape[0]
    mismatched: dict[str, int] = {"masks8": 0, "counts19": 0, "counts8": 0, "topn": 0}
    problems = []
    for start in range(0, count, _BLOCK_IMAGES):
        stop = min(start + _BLOCK_IMAGES, count)
        masks19 = archive["masks19"][start:stop]
        if masks19.size and int(masks19.max()) >= NUM_FINE:
            problems.append(f"/masks19 contains class id {int(masks19.max())} in images {start}..{stop}")
            continue
        counts19 = class_counts(masks19, NUM_FINE)
        counts8 = merge_counts(counts19, table)
        recomputed = {
            "masks8": merge_masks(masks19, table),
            "counts19": counts19,
            "counts8": counts8,
            "topn": top_n_labels(counts8, attrs["top_n"]),
        }
        for key, values in recomputed.items():
            stored = archive[key][start:stop]
            differs = stored.reshape(len(stored), -1) != values.reshape(len(values), -1)
            mismatched[key] += int(differs.any(axis=1).sum())
    for key, number in mismatched.items():
        if number:
            problems.append(f"/{key} disagrees with /masks19 and the archive settings for {number} images")
    return problems


def validate_archive(
    archive_path: str | os.PathLike, cache_path: str | os.PathLike, check_content: bool = False
) -> list[str]:
    """Return every difference between an archive and an image cache; an empty list means they match.

    ``check_content`` also recomputes the derived datasets from /masks19 (reads every mask).
    """
    cache = read_cache_info(cache_path)
    with open_archive(archive_path) as archive:
        problems = archive_cache_problems(archive, cache)
        if check_content and not problems:
            problems = content_problems(archive)
    return problems


# ---------------------------------------------------------------------------------------------
# Reader used by stage 2


def load_split(
    cache_path: str | os.PathLike,
    archive_path: str | os.PathLike | None = None,
    split: str = "train",
    top_n: int | None = None,
    *,
    merge_19_to_8: Sequence[int] | None = None,
) -> SplitData:
    """Load one split of an image cache into RAM, with its masks and top-n labels when an archive is given.

    Raises ArchiveMismatchError listing every difference when the archive does not belong to the
    cache (dataset, image list, names, labels, splits, mask size, format) or, when
    ``merge_19_to_8`` is given, was merged with another table. A ``top_n`` other than the
    archive's recomputes the labels from the stored coarse counts.
    """
    cache = read_cache_info(cache_path)
    indices = np.flatnonzero(np.asarray(cache.split, dtype=object) == split).astype(np.int64)
    if len(indices) == 0:
        available = ", ".join(sorted(set(cache.split))) or "none"
        raise ValueError(f"split {split!r} has no images in {cache.path}; splits present: {available}")
    expressions = tuple(json.loads(cache.attrs["expressions"]))
    if expressions != EXPRESSIONS:
        raise ValueError(f"{cache.path} lists expressions {list(expressions)}, expected {list(EXPRESSIONS)}")

    data = SplitData(
        images=np.empty((0,), dtype=np.uint8),  # read below, once the archive has been checked
        labels=cache.labels[indices].astype(np.int64),
        masks8=None,
        topn=None,
        counts8=None,
        names=[cache.names[i] for i in indices],
        expressions=expressions,
        coarse_names=FACE_PARTS_8,
        dataset=str(cache.attrs["dataset"]),
        top_n=None,
        attrs={"cache": dict(cache.attrs)},
        split=split,
        indices=indices,
    )
    if archive_path is not None:
        _load_archive_rows(data, cache, Path(archive_path), merge_19_to_8)
        if top_n is not None and top_n != data.top_n:
            logger.info("recomputing top-%d labels from counts8 (the archive stores top-%d)", top_n, data.top_n)
            data.topn = top_n_labels(data.counts8, top_n)
            data.top_n = int(top_n)

    with h5py.File(cache.path, "r") as file:
        data.images = _read_rows(file["images"], indices)
    logger.info(
        "loaded split %r of %s: %d images, masks from %s",
        split, cache.path, len(indices), archive_path if archive_path is not None else "no archive",
    )  # fmt: skip
    return data


def _load_archive_rows(
    data: SplitData, cache: CacheInfo, archive_path: Path, merge_19_to_8: Sequence[int] | None
) -> None:
    """Check an archive against the cache, then fill ``data`` with its rows for ``data.indices``."""
    with open_archive(archive_path) as archive:
        problems = archive_cache_problems(archive, cache)
        attrs = read_attrs(archive)
        if not problems and merge_19_to_8 is not None:
            stored = json.loads(attrs["merge_19_to_8"])
            requested = list(validate_merge_table(merge_19_to_8))
            if stored != requested:
                problems.append(
                    f"merge_19_to_8: archive {stored} vs requested {requested}; "
                    "write a matching archive with `slfer-parse derive --merge ...`"
                )
        if problems:
            raise ArchiveMismatchError(archive_path, problems)
        data.masks8 = _read_rows(archive["masks8"], data.indices)
        data.counts8 = _read_rows(archive["counts8"], data.indices)
        data.topn = _read_rows(archive["topn"], data.indices)
    data.coarse_names = tuple(json.loads(attrs["coarse_names"]))
    data.top_n = attrs["top_n"]
    data.attrs["archive"] = attrs


# ---------------------------------------------------------------------------------------------
# Shards, merging and deriving


def parse_shard_spec(text: str) -> tuple[int, int]:
    """Parse a shard written as "i/k" (0-based shard i of k)."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match:
        raise ValueError(f"invalid shard {text!r}: expected i/k, such as 0/4")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise ValueError(f"invalid shard {text!r}: need k >= 1 and 0 <= i < k")
    return index, count


def shard_range(num_images: int, index: int, count: int) -> tuple[int, int]:
    """Return the contiguous block [i*N//k, (i+1)*N//k) of images that shard i of k parses."""
    return index * num_images // count, (index + 1) * num_images // count


def _settings_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in attrs.items() if key not in VOLATILE_ATTRS}


def _copy_blocks(
    sources: Iterable[tuple[h5py.File, int, int]], target: h5py.File, keys: Sequence[str], total: int
) -> None:
    """Copy rows of ``keys`` from each (source file, source start, target start) into ``target``."""
    with tqdm(total=total, desc="copy", unit="img") as progress:
        for source, target_start, count in sources:
            for start in range(0, count, _BLOCK_IMAGES):
                stop = min(start + _BLOCK_IMAGES, count)
                for key in keys:
                    target[key][target_start + start : target_start + stop] = source[key][start:stop]
                progress.update(stop - start)


def merge_shards(shard_paths: Sequence[str | os.PathLike], out_path: str | os.PathLike) -> Path:
    """Concatenate shard archives of one cache into the archive a single run would have written.

    Checks that every shard is a valid archive with the same settings and provenance, and that
    the shards cover each image of the cache once, by recomputing the cache's image_list_hash.
    """
    paths = [Path(p) for p in shard_paths]
    files = []
    try:
        for path in paths:
            files.append(open_archive(path))
        return _merge_open_shards(paths, files, Path(out_path))
    finally:
        for file in files:
            file.close()


def _merge_open_shards(paths: list[Path], files: list[h5py.File], out_path: Path) -> Path:
    problems = []
    shards: dict[int, tuple[Path, h5py.File]] = {}
    counts = set()
    for path, file in zip(paths, files):
        format_problems = archive_format_problems(file)
        if format_problems:
            problems.append(f"{path}: " + "; ".join(format_problems))
            continue
        spec = read_attrs(file).get("shard")
        if spec is None:
            problems.append(f"{path} is not a shard (it has no 'shard' attribute)")
            continue
        try:
            index, count = parse_shard_spec(str(spec))
        except ValueError as error:
            problems.append(f"{path}: {error}")
            continue
        counts.add(count)
        if index in shards:
            problems.append(f"shard {index}/{count} given twice: {shards[index][0]} and {path}")
        shards[index] = (path, file)
    if problems:
        raise ValueError("cannot merge shards:\n  - " + "\n  - ".join(problems))
    if len(counts) != 1:
        raise ValueError(f"cannot merge shards written with different shard counts: k = {sorted(counts)}")
    count = counts.pop()
    missing = sorted(set(range(count)) - set(shards))
    if missing:
        raise ValueError(f"cannot merge: shard(s) {', '.join(f'{i}/{count}' for i in missing)} missing")

    ordered = [shards[i] for i in range(count)]
    reference_path, reference = ordered[0]
    reference_settings = _settings_attrs(read_attrs(reference))
    for path, file in ordered[1:]:
        settings = _settings_attrs(read_attrs(file))
        all_keys = set(settings) | set(reference_settings)
        differing = sorted(key for key in all_keys if settings.get(key) != reference_settings.get(key))
        if differing:
            details = "; ".join(f"{key}: {reference_settings.get(key)!r} vs {settings.get(key)!r}" for key in differing)
            raise ValueError(f"cannot merge {reference_path} and {path}: they differ in {details}")

    lengths = [file["names"].shape[0] for _, file in ordered]
    total = sum(lengths)
    for i, ((path, _), length) in enumerate(zip(ordered, lengths)):
        start, stop = shard_range(total, i, count)
        if length != stop - start:
            raise ValueError(
                f"shard {path} ({i}/{count}) contains {length} images, but shard {i} of {count} "
                f"over {total} images covers {stop - start}"
            )
    names = [name for _, file in ordered for name in _read_strings(file["names"])]
    labels = np.concatenate([file["labels"][...] for _, file in ordered])
    split = [item for _, file in ordered for item in _read_strings(file["split"])]
    if image_list_hash(names, labels, split) != reference_settings["image_list_hash"]:
        raise ValueError(
            "cannot merge: the shards' images together do not reproduce the cache's image_list_hash "
            f"{reference_settings['image_list_hash']}; were they written from different caches?"
        )

    size = reference_settings["mask_size"]
    with atomic_output(out_path) as temp_path:
        with h5py.File(temp_path, "w") as target:
            table = tuple(json.loads(reference_settings["merge_19_to_8"]))
            settings = ArchiveSettings(table, reference_settings["top_n"])
            _ArchiveWriter(target, total, size, settings)
            _write_index(target, names, labels, split)
            offsets = np.cumsum([0] + lengths)
            _copy_blocks(
                [(file, int(offsets[i]), lengths[i]) for i, (_, file) in enumerate(ordered)],
                target,
                ("masks19", "masks8", "counts19", "counts8", "topn"),
                total,
            )
            target.attrs.update({**reference_settings, "created": utc_timestamp()})
    logger.info("merged %d shards (%d images) into %s", count, total, out_path)
    return out_path


def derive_archive(
    archive_path: str | os.PathLike,
    out_path: str | os.PathLike,
    merge_19_to_8: Sequence[int] | None = None,
    top_n: int | None = None,
) -> Path:
    """Write a copy of an archive with another 19 -> 8 merge table and/or top-n, without parsing again.

    The 19-class masks and counts are copied; masks8, counts8 and topn are recomputed from them.
    Settings left as None keep the input archive's value.
    """
    archive_path, out_path = Path(archive_path), Path(out_path)
    if archive_path.resolve() == out_path.resolve():
        raise ValueError(f"derive would overwrite its input {archive_path}; choose another --out")
    with open_archive(archive_path) as source:
        problems = archive_format_problems(source)
        if problems:
            raise ArchiveMismatchError(archive_path, problems)
        attrs = read_attrs(source)
        settings = ArchiveSettings(
            tuple(merge_19_to_8) if merge_19_to_8 is not None else tuple(json.loads(attrs["merge_19_to_8"])),
            top_n if top_n is not None else attrs["top_n"],
        )
        count = source["names"].shape[0]
        with atomic_output(out_path) as temp_path:
            with h5py.File(temp_path, "w") as target:
                writer = _ArchiveWriter(target, count, attrs["mask_size"], settings)
                names, split = _read_strings(source["names"]), _read_strings(source["split"])
                _write_index(target, names, source["labels"][...], split)
                for start in tqdm(range(0, count, _BLOCK_IMAGES), desc="derive", unit="block"):
                    stop = min(start + _BLOCK_IMAGES, count)
                    masks19 = source["masks19"][start:stop]
                    counts19 = source["counts19"][start:stop]
                    target["masks19"][start:stop] = masks19
                    target["counts19"][start:stop] = counts19
                    writer.write_derived(start, masks19, counts19)
                target.attrs.update(
                    {
                        **attrs,
                        "merge_19_to_8": json.dumps(list(settings.merge_19_to_8)),
                        "top_n": settings.top_n,
                        "package_version": parsing.__version__,
                        "created": utc_timestamp(),
                    }
                )
    logger.info(
        "derived %s from %s (top_n=%d, merge=%s)", out_path, archive_path, settings.top_n, list(settings.merge_19_to_8)
    )
    return out_path
