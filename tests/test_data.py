"""Tests of slfer.data: split loading, batch order, and crops that keep masks aligned."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from parsing.labels import DEFAULT_MERGE_19_TO_8, EXPRESSIONS, FACE_PARTS_8, FACE_PARTS_19
from slfer.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchLoader,
    SplitTensors,
    apply_crop,
    centre_crop_plan,
    check_shardable,
    epoch_batches,
    gather_crop,
    load_split_tensors,
    normalise_images,
    random_crop_plans,
    slice_crop,
)

# Distinct colours per expression class, so a small network learns the classes quickly.
CLASS_COLOURS = np.array(
    [[220, 40, 40], [40, 200, 40], [40, 40, 220], [220, 220, 40], [220, 40, 220], [40, 220, 220], [128, 128, 128]],
    dtype=np.int16,
)


def _top_n(counts: np.ndarray, n: int) -> np.ndarray:
    """Reference top-n rule: count descending, ties to the lower id, zero counts unmarked."""
    order = np.argsort(-counts, axis=-1, kind="stable")
    labels = np.zeros(counts.shape, dtype=np.uint8)
    np.put_along_axis(labels, order[..., :n], 1, axis=-1)
    labels[counts == 0] = 0
    return labels


def _tiny_mask(size: int, label: int) -> np.ndarray:
    """Return a 19-class face-like mask whose mouth height grows with the expression label."""
    mask = np.zeros((size, size), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    centre = (size - 1) / 2
    mask[(yy - centre) ** 2 + (xx - centre) ** 2 < (0.4 * size) ** 2] = 1  # skin
    eye_row = size * 3 // 8
    mask[eye_row : eye_row + 2, size // 4 : size // 4 + 4] = 4  # l_eye
    mask[eye_row : eye_row + 2, size * 3 // 4 - 4 : size * 3 // 4] = 5  # r_eye
    mask[size // 2 : size // 2 + 3, size // 2 - 1 : size // 2 + 2] = 10  # nose
    mouth_row = size * 5 // 8
    mask[mouth_row : mouth_row + 1 + label // 2, size // 3 : size * 2 // 3] = 12  # u_lip
    mask[: size // 8, :] = 17  # hair
    return mask


def write_tiny_dataset(
    folder: Path,
    size: int = 32,
    train_per_class: int = 6,
    test_per_class: int = 3,
    seed: int = 0,
    top_n: int = 4,
    dataset: str = "tiny",
    expressions: tuple[str, ...] = EXPRESSIONS,
) -> tuple[Path, Path]:
    """Write an image cache and a mask archive in the slfer HDF5 formats; return their paths.

    Each class has its own colour with pixel noise, so the classes are learnable.
    """
    rng = np.random.default_rng(seed)
    names, labels, splits, images, masks19 = [], [], [], [], []
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for label in range(len(expressions)):
            for index in range(per_class):
                names.append(f"{split}/{expressions[label]}/{index:03d}.png")
                labels.append(label)
                splits.append(split)
                noise = rng.integers(-30, 31, size=(size, size, 3))
                images.append(np.clip(CLASS_COLOURS[label % len(CLASS_COLOURS)] + noise, 0, 255).astype(np.uint8))
                masks19.append(_tiny_mask(size, label))
    images = np.stack(images)
    masks19 = np.stack(masks19)
    masks8 = np.asarray(DEFAULT_MERGE_19_TO_8, dtype=np.uint8)[masks19]
    counts19 = np.stack([np.bincount(m.ravel(), minlength=19) for m in masks19]).astype(np.int32)
    counts8 = np.stack([np.bincount(m.ravel(), minlength=8) for m in masks8]).astype(np.int32)
    list_hash = hashlib.sha256(
        "".join(f"{n}\t{l}\t{s}\n" for n, l, s in zip(names, labels, splits)).encode("utf-8")
    ).hexdigest()
    string_type = h5py.string_dtype("utf-8")

    folder.mkdir(parents=True, exist_ok=True)
    cache_path = folder / "cache.h5"
    with h5py.File(cache_path, "w") as cache:
        cache.create_dataset("images", data=images, chunks=(1, size, size, 3))
        cache.create_dataset("names", data=names, dtype=string_type)
        cache.create_dataset("labels", data=np.asarray(labels, dtype=np.int16))
        cache.create_dataset("split", data=splits, dtype=string_type)
        cache.attrs.update(
            {
                "format": "slfer-image-cache",
                "format_version": 1,
                "dataset": dataset,
                "image_list_hash": list_hash,
                "image_size": size,
                "expressions": json.dumps(list(expressions)),
                "skipped": json.dumps([]),
                "source_format": "folder",
                "package_version": "test",
                "created": "2026-01-01T00:00:00+00:00",
            }
        )

    archive_path = folder / "masks.h5"
    with h5py.File(archive_path, "w") as archive:
        archive.create_dataset("masks19", data=masks19, chunks=(1, size, size), compression="gzip")
        archive.create_dataset("masks8", data=masks8, chunks=(1, size, size), compression="gzip")
        archive.create_dataset("counts19", data=counts19)
        archive.create_dataset("counts8", data=counts8)
        archive.create_dataset("topn", data=_top_n(counts8, top_n))
        archive.create_dataset("names", data=names, dtype=string_type)
        archive.create_dataset("labels", data=np.asarray(labels, dtype=np.int16))
        archive.create_dataset("split", data=splits, dtype=string_type)
        archive.attrs.update(
            {
                "format": "slfer-mask-archive",
                "format_version": 1,
                "dataset": dataset,
                "image_list_hash": list_hash,
                "parser_backend": "labels",
                "weights_sha256": "",
                "labels_source": "synthetic test masks",
                "parser_input_size": 0,
                "parser_precision": "",
                "mask_size": size,
                "merge_19_to_8": json.dumps(list(DEFAULT_MERGE_19_TO_8)),
                "fine_names": json.dumps(list(FACE_PARTS_19)),
                "coarse_names": json.dumps(list(FACE_PARTS_8)),
                "top_n": top_n,
                "package_version": "test",
                "created": "2026-01-01T00:00:00+00:00",
            }
        )
    return cache_path, archive_path


def _coded_split(num_images: int = 12, size: int = 16, seed: int = 0) -> SplitTensors:
    """Return a split whose pixels encode their own mask and position.

    R = mask * 20, G = column * 10, B = row * 10, so a crop can be decoded after augmentation.
    """
    generator = torch.Generator().manual_seed(seed)
    masks = torch.randint(0, 8, (num_images, size, size), generator=generator, dtype=torch.uint8)
    rows = torch.arange(size, dtype=torch.uint8).view(1, size, 1).expand(num_images, size, size)
    columns = torch.arange(size, dtype=torch.uint8).view(1, 1, size).expand(num_images, size, size)
    images = torch.stack([masks * 20, columns * 10, rows * 10], dim=-1).contiguous()
    return SplitTensors(
        images=images,
        labels=torch.arange(num_images) % 7,
        names=[f"image_{index}" for index in range(num_images)],
        expressions=EXPRESSIONS,
        dataset="coded",
        image_size=size,
        masks8=masks,
        topn=torch.zeros(num_images, 8, dtype=torch.uint8),
    )


def _decode(images: torch.Tensor) -> torch.Tensor:
    """Undo ImageNet normalisation: float [B, 3, H, W] -> uint8-valued int64 [B, H, W, 3]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((images * std + mean) * 255).round().long().permute(0, 2, 3, 1)


def test_random_crop_keeps_mask_aligned():
    split = _coded_split()
    loader = BatchLoader(split, torch.device("cpu"), crop_size=10, with_masks=True, with_topn=True)
    batches = epoch_batches(len(split), batch_size=12, seed=3, epoch=1)
    plan = random_crop_plans(batches, split.image_size, 10, seed=3, epoch=1)[0]
    batch = loader.load(batches[0], plan)

    decoded = _decode(batch.images)  # [B, 10, 10, 3]
    assert batch.images.shape == (12, 3, 10, 10)
    assert batch.masks8.shape == (12, 10, 10)
    assert torch.equal(decoded[..., 0], batch.masks8 * 20)
    for sample, index in enumerate(batches[0].tolist()):
        top, left = int(plan.top[sample]), int(plan.left[sample])
        expected = split.images[index, top : top + 10, left : left + 10]
        if plan.flip[sample]:
            expected = expected.flip(1)
        assert torch.equal(decoded[sample], expected.long()), f"sample {sample} differs from its reference crop"
        expected_mask = split.masks8[index, top : top + 10, left : left + 10]
        if plan.flip[sample]:
            expected_mask = expected_mask.flip(1)
        assert torch.equal(batch.masks8[sample], expected_mask.long())
        assert batch.labels[sample] == split.labels[index]


def test_random_crop_offsets_and_flips_vary():
    split = _coded_split(num_images=32)
    batches = epoch_batches(len(split), batch_size=32, seed=0, epoch=1)
    plan = random_crop_plans(batches, split.image_size, 10, seed=0, epoch=1)[0]
    loader = BatchLoader(split, torch.device("cpu"), crop_size=10, with_masks=True, with_topn=False)
    decoded = _decode(loader.load(batches[0], plan).images)

    first_columns = decoded[:, 0, 0, 1] // 10  # column of the top-left output pixel
    first_rows = decoded[:, 0, 0, 2] // 10
    column_steps = decoded[:, 0, 1, 1] - decoded[:, 0, 0, 1]  # +10 forward, -10 mirrored
    assert set(column_steps.tolist()) == {10, -10}
    assert torch.equal(column_steps < 0, plan.flip)
    assert len(set(first_rows.tolist())) > 1
    assert len(set(first_columns.tolist())) > 1
    assert int(plan.top.max()) <= split.image_size - 10
    assert int(plan.left.max()) <= split.image_size - 10


def test_centre_crop_exact():
    split = _coded_split(size=16)
    indices = torch.arange(len(split))
    plan = centre_crop_plan(len(split), 16, 10)
    cropped = apply_crop(split.images, plan, 10)
    assert torch.equal(cropped, split.images[:, 3:13, 3:13])
    assert not plan.flip.any()

    loader = BatchLoader(split, torch.device("cpu"), crop_size=10, with_masks=True, with_topn=False)
    batch = loader.load(indices, plan)
    assert torch.equal(_decode(batch.images), split.images[:, 3:13, 3:13].long())
    assert torch.equal(batch.masks8, split.masks8[:, 3:13, 3:13].long())


def test_gather_and_slice_crops_identical():
    # The CUDA path gathers, the CPU path slices: both must crop and mirror alike.
    split = _coded_split(num_images=24)
    batches = epoch_batches(len(split), batch_size=24, seed=3, epoch=1)
    plan = random_crop_plans(batches, split.image_size, 10, seed=3, epoch=1)[0]
    images = split.images.index_select(0, batches[0])
    masks = split.masks8.index_select(0, batches[0])
    assert plan.flip.any()
    assert not plan.flip.all()
    assert torch.equal(gather_crop(images, plan, 10), slice_crop(images, plan, 10))
    assert torch.equal(gather_crop(masks, plan, 10), slice_crop(masks, plan, 10))


def test_normalise_images_values():
    images = torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8)  # [1, 1, 1, 3]
    normalised = normalise_images(images)
    expected = torch.tensor(
        [(0 / 255 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (255 / 255 - 0.406) / 0.225]
    ).view(1, 3, 1, 1)
    assert normalised.dtype == torch.float32
    assert normalised.shape == (1, 3, 1, 1)
    assert torch.allclose(normalised, expected, atol=1e-6)


def test_epoch_batches_seeded_per_epoch():
    first = epoch_batches(50, batch_size=16, seed=7, epoch=2)
    again = epoch_batches(50, batch_size=16, seed=7, epoch=2)
    next_epoch = epoch_batches(50, batch_size=16, seed=7, epoch=3)
    other_seed = epoch_batches(50, batch_size=16, seed=8, epoch=2)

    assert len(first) == 3  # 50 // 16: the last 2 images are dropped this epoch
    assert all(batch.shape == (16,) for batch in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(torch.cat(first), torch.cat(next_epoch))
    assert not torch.equal(torch.cat(first), torch.cat(other_seed))
    assert len(set(torch.cat(first).tolist())) == 48


def test_epoch_batches_rejects_tiny_split():
    with pytest.raises(ValueError, match="fewer than one batch"):
        epoch_batches(5, batch_size=16, seed=0, epoch=1)


def test_shards_partition_global_batch():
    batch = epoch_batches(40, batch_size=8, seed=1, epoch=1)[0]
    plan = random_crop_plans([batch], 16, 10, seed=1, epoch=1)[0]
    shards = [batch[rank::2] for rank in range(2)]
    plan_shards = [plan.shard(rank, 2) for rank in range(2)]
    assert sorted(torch.cat(shards).tolist()) == sorted(batch.tolist())
    assert torch.equal(torch.stack(shards, dim=1).reshape(-1), batch)
    assert torch.equal(torch.stack([p.top for p in plan_shards], dim=1).reshape(-1), plan.top)
    with pytest.raises(ValueError, match="not a multiple"):
        check_shardable(6, 4)


def test_crop_plans_reproducible():
    batches = epoch_batches(40, batch_size=8, seed=1, epoch=4)
    first = random_crop_plans(batches, 32, 28, seed=1, epoch=4)
    again = random_crop_plans(batches, 32, 28, seed=1, epoch=4)
    other = random_crop_plans(batches, 32, 28, seed=1, epoch=5)
    assert all(torch.equal(a.top, b.top) and torch.equal(a.flip, b.flip) for a, b in zip(first, again))
    assert not all(torch.equal(a.top, b.top) for a, b in zip(first, other))


def test_crop_larger_than_image_rejected():
    split = _coded_split(size=16)
    with pytest.raises(ValueError, match="crop size 20 px does not fit images of 16 px"):
        BatchLoader(split, torch.device("cpu"), crop_size=20, with_masks=False, with_topn=False)


def test_load_split_tensors_from_files(tmp_path):
    cache_path, archive_path = write_tiny_dataset(tmp_path, size=32, train_per_class=2, test_per_class=1)
    train = load_split_tensors(cache_path, archive_path, "train")
    test = load_split_tensors(cache_path, None, "test")

    assert train.images.dtype == torch.uint8
    assert train.images.shape == (14, 32, 32, 3)
    assert train.masks8.shape == (14, 32, 32)
    assert train.topn.shape == (14, 8)
    assert train.labels.dtype == torch.int64
    assert train.labels.tolist() == [label for label in range(7) for _ in range(2)]
    assert train.names[0] == "train/angry/000.png"
    assert train.expressions == EXPRESSIONS
    assert test.masks8 is None
    assert len(test) == 7


def test_load_split_tensors_empty_split(tmp_path):
    cache_path, _ = write_tiny_dataset(tmp_path, size=32, train_per_class=1, test_per_class=1)
    with pytest.raises(ValueError, match="'validation'"):
        load_split_tensors(cache_path, None, "validation")
