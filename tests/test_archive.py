"""Mask archive: label arithmetic, writing, load_split, validation, shards, derive, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from parsing import archive as archive_module
from parsing.cache import image_list_hash
from parsing.archive import (
    ArchiveMismatchError,
    ArchiveSettings,
    class_counts,
    derive_archive,
    load_split,
    merge_counts,
    merge_masks,
    merge_shards,
    parse_merge_table,
    parse_shard_spec,
    read_cache_info,
    shard_range,
    top_n_labels,
    validate_archive,
    write_archive,
)
from fakes_caches import write_random_cache
from parsing.labels import DEFAULT_MERGE_19_TO_8, EXPRESSIONS, FACE_PARTS_8, FACE_PARTS_19

SIZE = 16


def write_cache(path: Path, count: int = 10, size: int = SIZE, dataset: str = "toy", seed: int = 0) -> Path:
    """Write an image cache with random pixels (see fakes_caches)."""
    return write_random_cache(path, count, size, dataset=dataset, seed=seed, test_every=3, extension="png")


def fake_masks19(first: int, count: int, size: int = SIZE) -> np.ndarray:
    """Deterministic 19-class masks for cache images first..first+count (a stand-in for a parser)."""
    masks = np.zeros((count, size, size), dtype=np.uint8)
    for i in range(count):
        image_rng = np.random.default_rng(first + i)
        present = image_rng.choice(len(FACE_PARTS_19), size=5, replace=False)
        masks[i] = image_rng.choice(present, size=(size, size))
    return masks


PROVENANCE = {
    "parser_backend": "labels",
    "weights_sha256": "",
    "labels_source": "test masks",
    "parser_input_size": 0,
    "parser_precision": "",
}


def write_fake_archive(cache_path: Path, out: Path, shard=None, settings=None, block: int = 3) -> Path:
    cache = read_cache_info(cache_path)
    start, stop = shard_range(cache.num_images, *shard) if shard else (0, cache.num_images)
    blocks = ((first, fake_masks19(first, min(block, stop - first))) for first in range(start, stop, block))
    return write_archive(out, cache, start, stop, PROVENANCE, settings or ArchiveSettings(), blocks, shard=shard)


@pytest.fixture
def cache_path(tmp_path: Path) -> Path:
    return write_cache(tmp_path / "cache.h5")


@pytest.fixture
def archive_path(tmp_path: Path, cache_path: Path) -> Path:
    return write_fake_archive(cache_path, tmp_path / "masks.h5")


def read_everything(path: Path) -> tuple[dict, dict]:
    with h5py.File(path, "r") as file:
        datasets = {key: file[key][...] for key in file}
        attrs = archive_module.read_attrs(file)
    return datasets, attrs


def drop_volatile(attrs: dict) -> dict:
    return {key: value for key, value in attrs.items() if key not in ("created", "shard")}


# ---------------------------------------------------------------------------------------------
# Label arithmetic


def test_default_merge_table_by_name():
    expected = {
        "background": "background", "skin": "skin",
        "l_brow": "eye", "r_brow": "eye", "l_eye": "eye", "r_eye": "eye", "eye_g": "eye",
        "l_ear": "ear", "r_ear": "ear", "ear_r": "ear",
        "nose": "nose",
        "mouth": "mouth", "u_lip": "mouth", "l_lip": "mouth",
        "neck": "neck", "neck_l": "neck", "cloth": "neck",
        "hair": "hair", "hat": "hair",
    }  # fmt: skip
    merged = merge_masks(np.arange(19, dtype=np.uint8), DEFAULT_MERGE_19_TO_8)
    assert [FACE_PARTS_8[c] for c in merged] == [expected[name] for name in FACE_PARTS_19]


def test_merge_table_rejects_bad_tables():
    with pytest.raises(ValueError, match="19 entries"):
        ArchiveSettings(merge_19_to_8=DEFAULT_MERGE_19_TO_8[:18])
    with pytest.raises(ValueError, match="entry 18 \\(hat\\)"):
        ArchiveSettings(merge_19_to_8=DEFAULT_MERGE_19_TO_8[:18] + (8,))
    with pytest.raises(ValueError, match="comma-separated"):
        parse_merge_table("0,1,x")
    assert parse_merge_table(",".join(map(str, DEFAULT_MERGE_19_TO_8))) == DEFAULT_MERGE_19_TO_8


def test_class_counts_match_loop():
    masks = np.random.default_rng(0).integers(0, 19, (4, 9, 7), dtype=np.uint8)
    counts = class_counts(masks, 19)
    assert counts.dtype == np.int32
    for i in range(4):
        assert counts[i].tolist() == np.bincount(masks[i].ravel(), minlength=19).tolist()
    assert (merge_counts(counts, DEFAULT_MERGE_19_TO_8) == class_counts(merge_masks(masks, DEFAULT_MERGE_19_TO_8), 8)).all()


def test_class_counts_reject_out_of_range():
    with pytest.raises(ValueError, match="class id 19"):
        class_counts(np.full((1, 2, 2), 19, dtype=np.uint8), 19)


def test_top_n_ties_go_to_lower_class():
    counts = np.array([5, 7, 7, 5, 1, 0, 0, 0])
    assert top_n_labels(counts, 1).tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    assert top_n_labels(counts, 3).tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


def test_top_n_skips_absent_classes():
    counts = np.array([0, 0, 9, 0, 0, 4, 0, 0])
    assert top_n_labels(counts, 4).tolist() == [0, 0, 1, 0, 0, 1, 0, 0]


def test_top_n_exceeds_present_classes():
    counts = np.array([[3, 1, 0, 2, 0, 0, 0, 0], [0] * 8])
    assert top_n_labels(counts, 8).tolist() == [[1, 1, 0, 1, 0, 0, 0, 0], [0] * 8]
    assert top_n_labels(counts, 20).tolist() == top_n_labels(counts, 8).tolist()
    assert top_n_labels(counts, 0).sum() == 0


def test_top_n_matches_sort_definition():
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 4, (200, 8))  # small values force many ties and zeros
    for n in range(0, 9):
        labels = top_n_labels(counts, n)
        for row, marked in zip(counts, labels):
            ranked = sorted(range(8), key=lambda c: (-row[c], c))[:n]
            expected = [1 if c in ranked and row[c] > 0 else 0 for c in range(8)]
            assert marked.tolist() == expected


def test_top_n_rejects_negative():
    with pytest.raises(ValueError, match="non-negative"):
        top_n_labels(np.ones(8), -1)
    with pytest.raises(ValueError, match="negative"):
        top_n_labels(np.array([-1, 2]), 1)


# ---------------------------------------------------------------------------------------------
# Writing and reading


def test_archive_layout(archive_path: Path, cache_path: Path):
    datasets, attrs = read_everything(archive_path)
    assert datasets["masks19"].shape == (10, SIZE, SIZE)
    assert (datasets["masks19"] == fake_masks19(0, 10)).all()
    assert (datasets["masks8"] == merge_masks(datasets["masks19"], DEFAULT_MERGE_19_TO_8)).all()
    assert (datasets["counts19"] == class_counts(datasets["masks19"], 19)).all()
    assert (datasets["counts8"] == class_counts(datasets["masks8"], 8)).all()
    assert (datasets["topn"] == top_n_labels(datasets["counts8"], 4)).all()
    assert datasets["counts8"].sum(axis=1).tolist() == [SIZE * SIZE] * 10
    cache = read_cache_info(cache_path)
    assert [name.decode() for name in datasets["names"]] == cache.names
    assert attrs["format"] == "slfer-mask-archive"
    assert attrs["format_version"] == 1
    assert attrs["image_list_hash"] == cache.attrs["image_list_hash"]
    assert json.loads(attrs["merge_19_to_8"]) == list(DEFAULT_MERGE_19_TO_8)
    assert attrs["top_n"] == 4
    assert attrs["mask_size"] == SIZE
    assert "shard" not in attrs
    with h5py.File(archive_path, "r") as file:
        assert file["masks19"].chunks == (1, SIZE, SIZE)
        assert file["masks8"].compression == "gzip"


def test_load_split_round_trip(archive_path: Path, cache_path: Path):
    data = load_split(cache_path, archive_path, split="train")
    train = [i for i in range(10) if i % 3]
    with h5py.File(cache_path, "r") as file:
        images = file["images"][...]
    assert data.indices.tolist() == train
    assert (data.images == images[train]).all()
    assert data.labels.dtype == np.int64
    assert data.labels.tolist() == [i % 7 for i in train]
    assert (data.masks8 == merge_masks(fake_masks19(0, 10), DEFAULT_MERGE_19_TO_8)[train]).all()
    assert (data.topn == top_n_labels(data.counts8, 4)).all()
    assert data.names[0] == "train/disgust/00001.png"
    assert data.expressions == EXPRESSIONS
    assert data.coarse_names == FACE_PARTS_8
    assert data.dataset == "toy"
    assert data.top_n == 4
    assert data.attrs["archive"]["parser_backend"] == "labels"
    assert data.attrs["cache"]["dataset"] == "toy"


def test_load_split_top_n_override(archive_path: Path, cache_path: Path):
    data = load_split(cache_path, archive_path, split="test", top_n=2)
    assert data.top_n == 2
    assert (data.topn == top_n_labels(data.counts8, 2)).all()
    assert (data.topn.sum(axis=1) <= 2).all()


def test_load_split_without_archive(cache_path: Path):
    data = load_split(cache_path, None, split="test")
    assert len(data.images) == 4
    assert data.masks8 is None
    assert data.topn is None
    assert data.counts8 is None
    assert data.top_n is None


def test_load_split_unknown_split(cache_path: Path):
    with pytest.raises(ValueError, match="splits present: test, train"):
        load_split(cache_path, None, split="val")


def test_load_split_rejects_other_merge(archive_path: Path, cache_path: Path):
    other = list(DEFAULT_MERGE_19_TO_8)
    other[17] = 6
    with pytest.raises(ArchiveMismatchError, match="merge_19_to_8"):
        load_split(cache_path, archive_path, split="train", merge_19_to_8=other)
    assert load_split(cache_path, archive_path, split="train", merge_19_to_8=DEFAULT_MERGE_19_TO_8).masks8 is not None


# ---------------------------------------------------------------------------------------------
# Validation


def test_validate_accepts_matching(archive_path: Path, cache_path: Path):
    assert validate_archive(archive_path, cache_path) == []
    assert validate_archive(archive_path, cache_path, check_content=True) == []


def test_validate_other_dataset(tmp_path: Path, archive_path: Path):
    other = write_cache(tmp_path / "other.h5", dataset="sfew")
    problems = validate_archive(archive_path, other)
    assert any(p == "dataset: archive 'toy' vs cache 'sfew'" for p in problems), problems
    with pytest.raises(ArchiveMismatchError, match="dataset: archive 'toy' vs cache 'sfew'"):
        load_split(other, archive_path, split="train")


def test_validate_reordered_names(tmp_path: Path, archive_path: Path):
    other = write_cache(tmp_path / "other.h5")
    with h5py.File(other, "r+") as file:
        names = file["names"].asstr()[...]
        names[[2, 5]] = names[[5, 2]]
        file["names"][...] = names
        file.attrs["image_list_hash"] = image_list_hash(names, file["labels"][...], file["split"].asstr()[...])
    problems = validate_archive(archive_path, other)
    assert len(problems) == 2, problems
    assert problems[0].startswith("image_list_hash: archive ")
    assert problems[1] == "2 names differ; first at index 2: archive 'train/fear/00002.png' vs cache 'train/surprise/00005.png'"


def test_validate_other_mask_size(tmp_path: Path, archive_path: Path):
    other = write_cache(tmp_path / "other.h5", size=SIZE * 2)
    problems = validate_archive(archive_path, other)
    assert problems == [f"mask size {SIZE} differs from the cache image size {SIZE * 2}"]


def test_validate_other_format_version(archive_path: Path, cache_path: Path):
    with h5py.File(archive_path, "r+") as file:
        file.attrs["format_version"] = 2
    assert validate_archive(archive_path, cache_path) == ["format_version is 2, this reader supports 1"]
    with pytest.raises(ArchiveMismatchError, match="format_version is 2"):
        load_split(cache_path, archive_path)


def test_validate_not_an_archive(cache_path: Path):
    assert validate_archive(cache_path, cache_path) == ["format is 'slfer-image-cache', expected 'slfer-mask-archive'"]


def test_validate_unexpected_dtype(archive_path: Path, cache_path: Path):
    with h5py.File(archive_path, "r+") as file:
        counts = file["counts8"][...]
        del file["counts8"]
        file.create_dataset("counts8", data=counts.astype(np.float64))
        file.create_dataset("extra", data=np.zeros(3))
    problems = validate_archive(archive_path, cache_path)
    assert "/counts8 has dtype float64, expected int32" in problems
    assert "unexpected object '/extra'" in problems


def test_validate_bad_merge_attr(archive_path: Path, cache_path: Path):
    with h5py.File(archive_path, "r+") as file:
        file.attrs["merge_19_to_8"] = json.dumps([0] * 18)
    problems = validate_archive(archive_path, cache_path)
    assert any("19 entries, got 18" in p for p in problems), problems


def test_validate_content_check(archive_path: Path, cache_path: Path):
    with h5py.File(archive_path, "r+") as file:
        file["masks8"][3, 0, 0] = (file["masks8"][3, 0, 0] + 1) % 8
    assert validate_archive(archive_path, cache_path) == []
    assert validate_archive(archive_path, cache_path, check_content=True) == [
        "/masks8 disagrees with /masks19 and the archive settings for 1 images"
    ]


def test_validate_non_hdf5_archive(tmp_path: Path, cache_path: Path):
    path = tmp_path / "masks.h5"
    path.write_text("not HDF5")
    with pytest.raises(ValueError, match="masks.h5 is not a readable HDF5 file"):
        validate_archive(path, cache_path)
    with pytest.raises(FileNotFoundError, match="mask archive not found"):
        load_split(cache_path, tmp_path / "absent.h5")


def test_read_cache_info_rejects_non_cache(archive_path: Path):
    with pytest.raises(ValueError, match="has format 'slfer-mask-archive', not 'slfer-image-cache'"):
        read_cache_info(archive_path)


# ---------------------------------------------------------------------------------------------
# Shards and merging


@pytest.mark.parametrize("count", [10, 3])
def test_shards_merge_equals_single_run(tmp_path: Path, count: int):
    cache = write_cache(tmp_path / "cache.h5", count=count)
    single = write_fake_archive(cache, tmp_path / "single.h5")
    shards = [write_fake_archive(cache, tmp_path / f"shard{i}.h5", shard=(i, 4), block=2) for i in (2, 0, 3, 1)]
    merged = merge_shards(shards, tmp_path / "merged.h5")

    single_data, single_attrs = read_everything(single)
    merged_data, merged_attrs = read_everything(merged)
    assert set(single_data) == set(merged_data)
    for key in single_data:
        assert single_data[key].dtype == merged_data[key].dtype, key
        assert np.array_equal(single_data[key], merged_data[key]), key
    assert drop_volatile(single_attrs) == drop_volatile(merged_attrs)
    assert "shard" not in merged_attrs
    assert validate_archive(merged, cache) == []


def test_shard_ranges_cover_images():
    for total in (0, 1, 7, 100):
        for parts in (1, 3, 8):
            covered = [i for k in range(parts) for i in range(*shard_range(total, k, parts))]
            assert covered == list(range(total))


def test_parse_shard_spec():
    assert parse_shard_spec("1/4") == (1, 4)
    for bad in ("4/4", "1/0", "a/b", "1"):
        with pytest.raises(ValueError, match="invalid shard"):
            parse_shard_spec(bad)


def test_merge_missing_shard(tmp_path: Path, cache_path: Path):
    shards = [write_fake_archive(cache_path, tmp_path / f"s{i}.h5", shard=(i, 3)) for i in (0, 2)]
    with pytest.raises(ValueError, match="shard\\(s\\) 1/3 missing"):
        merge_shards(shards, tmp_path / "merged.h5")
    assert not (tmp_path / "merged.h5").exists()


def test_merge_duplicate_shard(tmp_path: Path, cache_path: Path):
    first = write_fake_archive(cache_path, tmp_path / "a.h5", shard=(0, 2))
    again = write_fake_archive(cache_path, tmp_path / "b.h5", shard=(0, 2))
    with pytest.raises(ValueError, match="shard 0/2 given twice"):
        merge_shards([first, again], tmp_path / "merged.h5")


def test_merge_rejects_other_settings(tmp_path: Path, cache_path: Path):
    first = write_fake_archive(cache_path, tmp_path / "a.h5", shard=(0, 2))
    second = write_fake_archive(cache_path, tmp_path / "b.h5", shard=(1, 2), settings=ArchiveSettings(top_n=3))
    with pytest.raises(ValueError, match="differ in top_n: 4 vs 3"):
        merge_shards([first, second], tmp_path / "merged.h5")


def test_merge_rejects_changed_names(tmp_path: Path, cache_path: Path):
    first = write_fake_archive(cache_path, tmp_path / "a.h5", shard=(0, 2))
    second = write_fake_archive(cache_path, tmp_path / "b.h5", shard=(1, 2))
    with h5py.File(second, "r+") as file:
        names = file["names"].asstr()[...]
        names[0] = "changed.png"
        file["names"][...] = names
    with pytest.raises(ValueError, match="do not reproduce the cache's image_list_hash"):
        merge_shards([first, second], tmp_path / "merged.h5")


def test_merge_rejects_full_archive(tmp_path: Path, archive_path: Path):
    with pytest.raises(ValueError, match="is not a shard"):
        merge_shards([archive_path], tmp_path / "merged.h5")


def test_validate_rejects_shard(tmp_path: Path, cache_path: Path):
    shard = write_fake_archive(cache_path, tmp_path / "s.h5", shard=(0, 2))
    problems = validate_archive(shard, cache_path)
    assert problems[0] == "archive is shard 0/2 of a sharded run; merge the shards with `slfer-parse merge`"


# ---------------------------------------------------------------------------------------------
# Derive


def test_derive_new_top_n(tmp_path: Path, archive_path: Path, cache_path: Path):
    derived = derive_archive(archive_path, tmp_path / "top2.h5", top_n=2)
    source, source_attrs = read_everything(archive_path)
    result, result_attrs = read_everything(derived)
    assert (result["topn"] == top_n_labels(source["counts8"], 2)).all()
    for key in ("masks19", "masks8", "counts19", "counts8", "names", "labels", "split"):
        assert np.array_equal(result[key], source[key]), key
    assert result_attrs["top_n"] == 2
    assert {k: v for k, v in drop_volatile(result_attrs).items() if k != "top_n"} == {
        k: v for k, v in drop_volatile(source_attrs).items() if k != "top_n"
    }
    assert validate_archive(derived, cache_path, check_content=True) == []


def test_derive_new_merge(tmp_path: Path, archive_path: Path, cache_path: Path):
    table = list(DEFAULT_MERGE_19_TO_8)
    table[16] = 0  # cloth counted as background
    derived = derive_archive(archive_path, tmp_path / "merge.h5", merge_19_to_8=table)
    source, _ = read_everything(archive_path)
    result, attrs = read_everything(derived)
    assert (result["masks8"] == np.asarray(table, dtype=np.uint8)[source["masks19"]]).all()
    assert (result["counts8"] == class_counts(result["masks8"], 8)).all()
    assert (result["topn"] == top_n_labels(result["counts8"], 4)).all()
    assert json.loads(attrs["merge_19_to_8"]) == table
    assert validate_archive(derived, cache_path, check_content=True) == []


def test_derive_refuses_in_place(archive_path: Path):
    with pytest.raises(ValueError, match="overwrite its input"):
        derive_archive(archive_path, archive_path, top_n=2)


# ---------------------------------------------------------------------------------------------
# Atomic writes


def test_interrupted_write_leaves_nothing(tmp_path: Path, cache_path: Path):
    cache = read_cache_info(cache_path)

    def failing_blocks():
        yield 0, fake_masks19(0, 3)
        raise RuntimeError("parser crashed")

    out = tmp_path / "out" / "masks.h5"
    with pytest.raises(RuntimeError, match="parser crashed"):
        write_archive(out, cache, 0, cache.num_images, PROVENANCE, ArchiveSettings(), failing_blocks())
    assert list(out.parent.iterdir()) == []


def test_short_parser_output_leaves_nothing(tmp_path: Path, cache_path: Path):
    cache = read_cache_info(cache_path)
    out = tmp_path / "masks.h5"
    with pytest.raises(RuntimeError, match="stopped after image 3"):
        write_archive(out, cache, 0, cache.num_images, PROVENANCE, ArchiveSettings(), [(0, fake_masks19(0, 3))])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.h5"]


def test_failed_rewrite_keeps_old_archive(tmp_path: Path, archive_path: Path, cache_path: Path):
    before = archive_path.read_bytes()
    cache = read_cache_info(cache_path)
    with pytest.raises(ValueError, match="class id"):
        write_archive(
            archive_path, cache, 0, cache.num_images, PROVENANCE, ArchiveSettings(),
            [(0, np.full((10, SIZE, SIZE), 30, dtype=np.uint8))],
        )  # fmt: skip
    assert archive_path.read_bytes() == before


def test_validate_other_source_files(tmp_path: Path):
    # Two renderings with identical names, labels and splits: only the file bytes differ.
    from parsing.cache import build_cache
    from parsing.datasets import read_dataset
    from parsing.parsers import LabelMapParser, parse_cache
    from parsing.synthetic import generate_dataset

    caches = []
    for seed in (3, 4):
        root = tmp_path / f"synth{seed}"
        generate_dataset(root, seed=seed, size=32, train_per_class=1, test_per_class=1, label_noise=0.0)
        caches.append((root, build_cache(read_dataset("folder", root / "images"), tmp_path / f"c{seed}.h5", "synth", size=32)))
    (root_a, cache_a), (_, cache_b) = caches
    archive = tmp_path / "masks_a.h5"
    parse_cache(cache_a, archive, LabelMapParser(root_a / "labels"), ArchiveSettings(DEFAULT_MERGE_19_TO_8, 4), workers=0)

    assert validate_archive(archive, cache_a) == []
    problems = validate_archive(archive, cache_b)
    assert len(problems) == 1
    assert problems[0].startswith("source_hash: archive ")
    assert "other image files" in problems[0]
    with pytest.raises(ArchiveMismatchError, match="source_hash"):
        load_split(cache_b, archive, split="train")


def test_validate_hdf5_without_format(tmp_path: Path, cache_path: Path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as file:
        file.create_dataset("values", data=np.arange(3))
    problems = validate_archive(other, cache_path)
    assert len(problems) == 1
    assert problems[0].startswith("not a mask archive: the file has no 'format' attribute")
