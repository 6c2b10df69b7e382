"""The image cache: every image of a dataset decoded once, resized and stored in HDF5.

Layout (format "slfer-image-cache", format_version 1):

- ``/images`` uint8 [N, S, S, 3] RGB, chunks (1, S, S, 3), uncompressed.
- ``/names`` UTF-8 str [N] (names relative to the dataset root), ``/labels`` int16 [N]
  (ids into ``EXPRESSIONS``), ``/split`` UTF-8 str [N], ``/source_sha256`` ASCII [N]
  (SHA-256 of each source file's bytes).
- attrs: format, format_version, dataset, image_list_hash, image_size, expressions (JSON),
  skipped (JSON list of {"path", "reason"}), source_format, package_version, created
  (ISO 8601 UTC), resize (how images were resized) and source_hash (``source_hash()`` of
  the per-file digests).

Images are resized to S x S without cropping or padding (see ``parsing.imageio.resize_rgb``).
The cache holds licensed face images, so it stays on the machine that built it. This module
also registers the ``list`` and ``cache`` subcommands of ``slfer-parse``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

import parsing
from parsing.atomic import atomic_output
from parsing.datasets import (
    FORMATS,
    ON_BAD_CHOICES,
    SKIP_HINT,
    DatasetError,
    DatasetListing,
    ImageRecord,
    SkipLog,
    format_counts_table,
    read_dataset,
)
from parsing.imageio import BadImageError, decode_rgb_bytes, resize_rgb
from parsing.labels import EXPRESSIONS

logger = logging.getLogger(__name__)

FORMAT = "slfer-image-cache"
FORMAT_VERSION = 1
DEFAULT_IMAGE_SIZE = 256
RESIZE_DESCRIPTION = (
    "square resize without crop or padding; cv2.INTER_AREA when no axis grows, "
    "cv2.INTER_LINEAR otherwise"
)
_REQUIRED_DATASETS = ("images", "names", "labels", "split")
_REQUIRED_ATTRS = ("dataset", "image_list_hash", "image_size", "expressions")
# Images handed to a worker process at a time.
_WORKER_CHUNK_SIZE = 8


class CacheFormatError(ValueError):
    """A file that is not a readable slfer image cache of a supported version."""


@dataclass(frozen=True)
class CacheIndex:
    """Everything in an image cache except the pixels."""

    names: list[str]
    labels: np.ndarray  # int64 [N], ids into EXPRESSIONS
    split: list[str]
    attrs: dict  # HDF5 attributes as Python values; JSON attributes stay JSON text

    @property
    def skipped(self) -> list[dict]:
        """Entries skipped while listing or decoding, as {"path", "reason"} dicts."""
        return json.loads(self.attrs.get("skipped", "[]"))

    @property
    def expressions(self) -> tuple[str, ...]:
        """Class names in label id order, as stored in the cache."""
        return tuple(json.loads(self.attrs["expressions"]))


def image_list_hash(names: Sequence[str], labels: Iterable[int], splits: Sequence[str]) -> str:
    """Return the sha256 hex digest of ``"name\\tlabel\\tsplit\\n"`` joined in list order."""
    labels = [int(label) for label in labels]
    if not len(names) == len(labels) == len(splits):
        raise ValueError(
            f"names, labels and splits differ in length: {len(names)}, {len(labels)}, "
            f"{len(splits)}"
        )
    digest = hashlib.sha256()
    for name, label, split in zip(names, labels, splits):
        digest.update(f"{name}\t{label}\t{split}\n".encode("utf-8"))
    return digest.hexdigest()


def load_resized(path: Path, size: int) -> tuple[np.ndarray | None, str | None, str | None]:
    """Decode and resize one image; return (uint8 [size, size, 3], None, file SHA-256) or
    (None, reason, None).

    Only ``BadImageError`` becomes a reason; any other exception propagates.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        return None, f"cannot read the file ({error})", None
    try:
        image = decode_rgb_bytes(data, path)
    except BadImageError as error:
        return None, error.reason, None
    return resize_rgb(image, size), None, hashlib.sha256(data).hexdigest()


def source_hash(file_digests: Sequence[str]) -> str:
    """Hash the SHA-256 digests of the source image files, in cache order, into one digest.

    Two caches built from the same files have the same source hash whatever their decoder
    or resize, so an archive can be checked against the files it was parsed from.
    """
    return hashlib.sha256("\n".join(file_digests).encode("ascii")).hexdigest()


def _decoded_images(
    paths: list[Path], size: int, workers: int
) -> Iterator[tuple[np.ndarray | None, str | None, str | None]]:
    """Yield ``load_resized`` results in the order of ``paths``, with optional processes."""
    if workers <= 0:
        for path in paths:
            yield load_resized(path, size)
        return
    # "spawn" keeps workers free of the parent's threads and open HDF5 handles.
    # NOTE: spawn imports the caller's main module again, so a script that calls build_cache
    # with workers > 0 needs the usual `if __name__ == "__main__":` guard.
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes=workers) as pool:
        task = functools.partial(load_resized, size=size)
        yield from pool.imap(task, paths, chunksize=_WORKER_CHUNK_SIZE)


def build_cache(
    listing: DatasetListing,
    out_path: str | os.PathLike,
    dataset_name: str,
    size: int = DEFAULT_IMAGE_SIZE,
    on_bad: str = "error",
    workers: int = 0,
) -> Path:
    """Decode every image of ``listing``, resize it to ``size`` x ``size`` and write a cache.

    The file is written as ``<out_path>.tmp-<pid>`` and renamed onto ``out_path`` only when
    complete; on any exception the temporary file is removed. An image that fails to decode
    raises ``BadImageError`` when ``on_bad="error"``. With ``on_bad="skip"`` it is left out
    and recorded, with the listing's own skipped entries, in the ``skipped`` attribute.
    ``workers`` > 0 decodes in that many processes; the images are written in listing order
    either way. Returns ``out_path``.
    """
    if not dataset_name:
        raise ValueError("dataset_name must not be empty")
    if size < 1:
        raise ValueError(f"invalid image size {size}; expected a positive number of pixels")
    if not listing.records:
        raise DatasetError(f"the listing of {listing.root} contains no images")
    out_path = Path(out_path)
    skips = SkipLog(on_bad, skipped=list(listing.skipped))
    records = listing.records
    count = len(records)
    logger.info(
        "caching %d images of %s at %dx%d into %s (%d workers)",
        count,
        dataset_name,
        size,
        size,
        out_path,
        workers,
    )

    with atomic_output(out_path) as temp_path, h5py.File(temp_path, "w") as handle:
        images = handle.create_dataset(
            "images",
            shape=(count, size, size, 3),
            maxshape=(None, size, size, 3),
            dtype=np.uint8,
            chunks=(1, size, size, 3),
        )
        kept, digests = _write_images(images, records, size, on_bad, workers, skips, dataset_name)
        if not kept:
            raise DatasetError(f"none of the {count} images of {listing.root} could be decoded")
        images.resize(len(kept), axis=0)
        _write_index(handle, kept)
        handle.create_dataset("source_sha256", data=np.array(digests, dtype="S64"))
        _write_attrs(handle, listing, kept, dataset_name, size, skips.skipped)
        handle.attrs["source_hash"] = source_hash(digests)

    written = DatasetListing(kept, skips.skipped, listing.source_format, listing.root)
    logger.info(
        "wrote %s: %d images, %d skipped\n%s",
        out_path,
        len(kept),
        len(skips.skipped),
        format_counts_table(written.counts()),
    )
    return out_path


def _write_images(
    images: h5py.Dataset,
    records: list[ImageRecord],
    size: int,
    on_bad: str,
    workers: int,
    skips: SkipLog,
    dataset_name: str,
) -> tuple[list[ImageRecord], list[str]]:
    """Decode ``records`` into consecutive rows of ``images``.

    Returns the records written and the SHA-256 of each one's file.
    """
    kept: list[ImageRecord] = []
    digests: list[str] = []
    decoded = _decoded_images([record.path for record in records], size, workers)
    # closing() shuts the worker pool down at once when the loop raises.
    with contextlib.closing(decoded):
        progress = tqdm(decoded, total=len(records), desc=f"cache {dataset_name}", unit="image")
        for record, (image, reason, digest) in zip(records, progress):
            if image is None:
                if on_bad == "error":
                    raise BadImageError(record.path, f"{reason}. {SKIP_HINT}")
                skips.record(record.path, reason)
                continue
            images[len(kept)] = image
            kept.append(record)
            digests.append(digest)
    return kept, digests


def _write_index(handle: h5py.File, records: list[ImageRecord]) -> None:
    text = h5py.string_dtype("utf-8")
    handle.create_dataset("names", data=[record.name for record in records], dtype=text)
    handle.create_dataset(
        "labels", data=np.array([record.label for record in records], dtype=np.int16)
    )
    handle.create_dataset("split", data=[record.split for record in records], dtype=text)


def _write_attrs(
    handle: h5py.File,
    listing: DatasetListing,
    records: list[ImageRecord],
    dataset_name: str,
    size: int,
    skipped: list[dict],
) -> None:
    attrs = handle.attrs
    attrs["format"] = FORMAT
    attrs["format_version"] = FORMAT_VERSION
    attrs["dataset"] = dataset_name
    attrs["image_list_hash"] = image_list_hash(
        [record.name for record in records],
        [record.label for record in records],
        [record.split for record in records],
    )
    attrs["image_size"] = size
    attrs["expressions"] = json.dumps(list(EXPRESSIONS))
    attrs["skipped"] = json.dumps(skipped)
    attrs["source_format"] = listing.source_format
    attrs["package_version"] = parsing.__version__
    attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    attrs["resize"] = RESIZE_DESCRIPTION


# --- reading ------------------------------------------------------------------------------------


def _python_value(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def check_cache_file(handle: h5py.File, path: str | os.PathLike) -> None:
    """Raise ``CacheFormatError`` unless ``handle`` is an image cache of ``FORMAT_VERSION``."""
    fmt = _python_value(handle.attrs.get("format"))
    if fmt is None:
        raise CacheFormatError(
            f"{path} is not a slfer image cache: it has no 'format' attribute. "
            "Create a cache with 'slfer-parse cache'."
        )
    if fmt != FORMAT:
        raise CacheFormatError(
            f"{path} has format {fmt!r}, not {FORMAT!r}; pass an image cache written by "
            "'slfer-parse cache'"
        )
    version = _python_value(handle.attrs.get("format_version"))
    if version != FORMAT_VERSION:
        raise CacheFormatError(
            f"{path} has format_version {version!r}; this version of slfer reads "
            f"{FORMAT_VERSION}. Rebuild the cache with 'slfer-parse cache'."
        )
    missing = [name for name in _REQUIRED_DATASETS if name not in handle]
    missing += [f"attribute {name}" for name in _REQUIRED_ATTRS if name not in handle.attrs]
    if missing:
        raise CacheFormatError(f"{path} is an incomplete image cache: missing {missing}")


def open_cache(path: str | os.PathLike) -> h5py.File:
    """Open an image cache read-only after checking its format; use it as a context manager."""
    try:
        handle = h5py.File(path, "r")
    except FileNotFoundError:
        raise
    except OSError as error:
        raise CacheFormatError(f"{path} is not an HDF5 file ({error})") from error
    try:
        check_cache_file(handle, path)
    except BaseException:
        handle.close()
        raise
    return handle


def read_cache_index(path: str | os.PathLike) -> CacheIndex:
    """Read the names, labels, splits and attributes of an image cache, without pixels.

    Raises ``CacheFormatError`` when the file is not a cache, when the index lengths differ
    from the number of images, or when the stored ``image_list_hash`` does not match.
    """
    with open_cache(path) as handle:
        names = [str(name) for name in handle["names"].asstr()[()]]
        labels = handle["labels"][()].astype(np.int64)
        split = [str(value) for value in handle["split"].asstr()[()]]
        image_count = handle["images"].shape[0]
        attrs = {key: _python_value(value) for key, value in handle.attrs.items()}

    if not len(names) == len(labels) == len(split) == image_count:
        raise CacheFormatError(
            f"{path} is inconsistent: {image_count} images, {len(names)} names, "
            f"{len(labels)} labels, {len(split)} splits"
        )
    expected_hash = image_list_hash(names, labels, split)
    if attrs["image_list_hash"] != expected_hash:
        raise CacheFormatError(
            f"{path} is inconsistent: its image_list_hash {attrs['image_list_hash']} does not "
            f"match its names, labels and splits ({expected_hash}). Rebuild the cache."
        )
    return CacheIndex(names=names, labels=labels, split=split, attrs=attrs)


# --- command line -------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", required=True, choices=FORMATS, help="dataset layout")
    parser.add_argument("--root", required=True, type=Path, help="dataset root folder")
    parser.add_argument(
        "--manifest",
        type=Path,
        default=None,
        help="CSV manifest for --format csv (default: ROOT/manifest.csv); paths in it are "
        "relative to ROOT",
    )
    parser.add_argument(
        "--on-bad",
        choices=ON_BAD_CHOICES,
        default="error",
        help="what to do with a missing, unreadable or non-image file: stop with an error "
        "(default) or skip it and record it",
    )


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``list`` and ``cache`` subcommands; each sets ``func`` to its handler."""
    list_parser = subparsers.add_parser(
        "list",
        help="print image counts per split and class",
        description="Read a dataset and print its image counts per split and class.",
    )
    _add_dataset_arguments(list_parser)
    list_parser.set_defaults(func=run_list)

    cache_parser = subparsers.add_parser(
        "cache",
        help="decode, resize and store a dataset's images in an HDF5 image cache",
        description="Decode every image of a dataset once, resize it to SIZE x SIZE RGB and "
        "write an HDF5 image cache (written to a temporary name, renamed when complete).",
    )
    _add_dataset_arguments(cache_parser)
    cache_parser.add_argument("--name", required=True, help="dataset name stored in the cache")
    cache_parser.add_argument("--out", required=True, type=Path, help="cache file to write")
    cache_parser.add_argument(
        "--size",
        type=_positive_int,
        default=DEFAULT_IMAGE_SIZE,
        help=f"side of the square cached images in pixels (default {DEFAULT_IMAGE_SIZE})",
    )
    cache_parser.add_argument(
        "--workers",
        type=_non_negative_int,
        default=0,
        help="processes that decode images (default 0: decode in the main process)",
    )
    cache_parser.set_defaults(func=run_cache)


def _listing_from_args(args: argparse.Namespace) -> DatasetListing:
    if args.manifest is not None and args.format != "csv":
        raise DatasetError(f"--manifest is only read with --format csv, not {args.format}")
    return read_dataset(args.format, args.root, manifest=args.manifest, on_bad=args.on_bad)


def run_list(args: argparse.Namespace) -> int:
    """Print the counts table of a dataset (and its skipped entries); return the exit code."""
    try:
        listing = _listing_from_args(args)
    except DatasetError as error:
        logger.error("%s", error)
        return 1
    print(format_counts_table(listing.counts()))
    if listing.skipped:
        print(f"skipped {len(listing.skipped)} entries:")
        for entry in listing.skipped:
            print(f"  {entry['path']}: {entry['reason']}")
    return 0


def run_cache(args: argparse.Namespace) -> int:
    """Write the image cache of a dataset; return the exit code."""
    try:
        listing = _listing_from_args(args)
        build_cache(
            listing,
            args.out,
            args.name,
            size=args.size,
            on_bad=args.on_bad,
            workers=args.workers,
        )
    except (DatasetError, BadImageError) as error:
        logger.error("%s", error)
        return 1
    return 0

