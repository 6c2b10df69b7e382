"""Image cache: list and cache commands, HDF5 layout, bad files, atomic writes."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging

import h5py
import numpy as np
import pytest
from fakes_datasets import make_folder_tree, make_rafdb_tree, make_sfew_tree

import parsing
import parsing.cache
from parsing.atomic import atomic_output
from parsing.cache import (
    FORMAT,
    CacheFormatError,
    add_commands,
    build_cache,
    image_list_hash,
    open_cache,
    read_cache_index,
)
from parsing.datasets import DatasetError, read_dataset
from parsing.imageio import BadImageError, decode_rgb, resize_rgb
from parsing.labels import EXPRESSIONS

SIZE = 24


def run_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slfer-parse")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_commands(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


def leftover_temp_files(folder):
    return sorted(path.name for path in folder.iterdir() if ".tmp-" in path.name)


def truncate(path, keep_fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


# --- commands ----------------------------------------------------------------------------


def test_list_command_rafdb(tmp_path, capsys):
    make_rafdb_tree(tmp_path / "rafdb", n_train_per_class=2, n_test_per_class=1)
    exit_code = run_command(["list", "--format", "rafdb", "--root", str(tmp_path / "rafdb")])
    assert exit_code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["split", *EXPRESSIONS, "total"]
    assert lines[1].split() == ["test"] + ["1"] * 7 + ["7"]
    assert lines[2].split() == ["train"] + ["2"] * 7 + ["14"]


def test_list_command_reports_skips(tmp_path, capsys):
    make_folder_tree(tmp_path)
    odd = tmp_path / "train" / "sad" / "clip.gif"
    odd.write_bytes(b"GIF89a")
    exit_code = run_command(["list", "--format", "folder", "--root", str(tmp_path), "--on-bad", "skip"])
    assert exit_code == 0
    output = capsys.readouterr().out
    assert "skipped 1 entries" in output
    assert str(odd) in output


def test_list_command_error_exit_code(tmp_path, caplog):
    make_folder_tree(tmp_path)
    (tmp_path / "train" / "sad" / "clip.gif").write_bytes(b"GIF89a")
    with caplog.at_level(logging.ERROR):
        exit_code = run_command(["list", "--format", "folder", "--root", str(tmp_path)])
    assert exit_code == 1
    assert "clip.gif" in caplog.text


def test_list_rejects_manifest_for_folder(tmp_path, caplog):
    make_folder_tree(tmp_path)
    argv = ["list", "--format", "folder", "--root", str(tmp_path), "--manifest", "m.csv"]
    assert run_command(argv) == 1
    assert "--manifest is only read with --format csv" in caplog.text


def test_cache_command_rafdb(tmp_path):
    root = tmp_path / "rafdb"
    expected = make_rafdb_tree(root, n_train_per_class=2, n_test_per_class=1, size=40)
    out = tmp_path / "caches" / "rafdb.h5"
    argv = ["cache", "--format", "rafdb", "--root", str(root), "--name", "rafdb", "--out", str(out), "--size", str(SIZE)]
    assert run_command(argv) == 0
    assert leftover_temp_files(out.parent) == []

    index = read_cache_index(out)
    assert index.names == [name for name, _, _ in expected]
    assert index.labels.tolist() == [EXPRESSIONS.index(label) for _, label, _ in expected]
    assert index.split == [split for _, _, split in expected]
    assert index.expressions == EXPRESSIONS
    assert index.skipped == []

    attrs = index.attrs
    assert attrs["format"] == FORMAT
    assert attrs["format_version"] == 1
    assert attrs["dataset"] == "rafdb"
    assert attrs["image_size"] == SIZE
    assert attrs["source_format"] == "rafdb"
    assert attrs["package_version"] == parsing.__version__
    created = datetime.datetime.fromisoformat(attrs["created"])
    assert created.utcoffset() == datetime.timedelta(0)
    assert attrs["image_list_hash"] == image_list_hash(index.names, index.labels, index.split)

    with h5py.File(out, "r") as handle:
        images = handle["images"]
        assert images.shape == (len(expected), SIZE, SIZE, 3)
        assert images.dtype == np.uint8
        assert images.chunks == (1, SIZE, SIZE, 3)
        assert images.compression is None
        assert handle["labels"].dtype == np.int16
        for row, name in enumerate(index.names):
            expected_pixels = resize_rgb(decode_rgb(root / name), SIZE)
            np.testing.assert_array_equal(images[row], expected_pixels)


@pytest.mark.parametrize("layout", ["plain", "nested"])
def test_cache_command_sfew(tmp_path, layout):
    root = tmp_path / "sfew"
    expected = make_sfew_tree(root, n_train_per_class=2, n_val_per_class=1, layout=layout)
    out = tmp_path / "sfew.h5"
    argv = ["cache", "--format", "sfew", "--root", str(root), "--name", "sfew", "--out", str(out), "--size", str(SIZE)]
    assert run_command(argv) == 0
    index = read_cache_index(out)
    assert index.names == [name for name, _, _ in expected]
    assert index.split.count("train") == 14
    assert index.split.count("test") == 7
    with open_cache(out) as handle:
        # SFEW faces are portrait (18 x 14 here) and are stretched to a square.
        assert handle["images"].shape[1:] == (SIZE, SIZE, 3)


def test_workers_match_serial(tmp_path):
    make_sfew_tree(tmp_path / "sfew", n_train_per_class=2, n_val_per_class=1)
    listing = read_dataset("sfew", tmp_path / "sfew")
    serial = build_cache(listing, tmp_path / "serial.h5", "sfew", size=SIZE, workers=0)
    parallel = build_cache(listing, tmp_path / "parallel.h5", "sfew", size=SIZE, workers=2)
    with h5py.File(serial, "r") as first, h5py.File(parallel, "r") as second:
        np.testing.assert_array_equal(first["images"][()], second["images"][()])
        assert first.attrs["image_list_hash"] == second.attrs["image_list_hash"]


# --- bad files ---------------------------------------------------------------------------


def test_truncated_image_error_names_file(tmp_path):
    make_folder_tree(tmp_path / "data")
    broken = tmp_path / "data" / "train" / "fear" / "00001.png"
    truncate(broken)
    listing = read_dataset("folder", tmp_path / "data")
    out = tmp_path / "cache.h5"
    with pytest.raises(BadImageError, match="00001.png") as caught:
        build_cache(listing, out, "demo", size=SIZE)
    assert caught.value.path == broken
    assert "--on-bad skip" in str(caught.value)
    assert not out.exists()
    assert leftover_temp_files(tmp_path) == []


def test_cache_command_bad_image_exit_code(tmp_path, caplog):
    make_folder_tree(tmp_path / "data")
    truncate(tmp_path / "data" / "test" / "happy" / "00000.png")
    out = tmp_path / "cache.h5"
    argv = ["cache", "--format", "folder", "--root", str(tmp_path / "data"), "--name", "demo", "--out", str(out)]
    with caplog.at_level(logging.ERROR):
        assert run_command(argv) == 1
    assert "00000.png" in caplog.text
    assert not out.exists()


def test_skipped_entries_recorded_in_cache(tmp_path):
    expected = make_folder_tree(tmp_path / "data")
    broken = tmp_path / "data" / "train" / "fear" / "00001.png"
    truncate(broken)
    odd = tmp_path / "data" / "train" / "sad" / "clip.gif"
    odd.write_bytes(b"GIF89a")
    listing = read_dataset("folder", tmp_path / "data", on_bad="skip")
    out = build_cache(listing, tmp_path / "cache.h5", "demo", size=SIZE, on_bad="skip")

    index = read_cache_index(out)
    skipped_paths = [entry["path"] for entry in index.skipped]
    assert skipped_paths == [str(odd), str(broken)]
    assert "truncated" in index.skipped[1]["reason"]
    assert "train/fear/00001.png" not in index.names
    assert len(index.names) == len(expected) - 1
    assert json.loads(index.attrs["skipped"]) == index.skipped
    with h5py.File(out, "r") as handle:
        assert handle["images"].shape[0] == len(expected) - 1


def test_every_image_bad_is_error(tmp_path):
    (tmp_path / "data" / "train" / "happy").mkdir(parents=True)
    (tmp_path / "data" / "train" / "happy" / "a.png").write_bytes(b"not a png")
    listing = read_dataset("folder", tmp_path / "data")
    with pytest.raises(DatasetError, match="none of the 1 images"):
        build_cache(listing, tmp_path / "cache.h5", "demo", size=SIZE, on_bad="skip")
    assert not (tmp_path / "cache.h5").exists()


# --- interrupted writes ----------------------------------------------------------------------


@pytest.mark.parametrize("error_type", [RuntimeError, KeyboardInterrupt])
def test_interrupted_write_leaves_no_cache(tmp_path, monkeypatch, error_type):
    make_folder_tree(tmp_path / "data")
    listing = read_dataset("folder", tmp_path / "data")
    out = tmp_path / "cache.h5"
    out.write_bytes(b"previous cache")
    calls = []
    real_decode = parsing.cache.decode_rgb_bytes

    def failing_decode(data, path):
        calls.append(path)
        if len(calls) == 3:
            raise error_type("simulated failure while decoding")
        return real_decode(data, path)

    monkeypatch.setattr(parsing.cache, "decode_rgb_bytes", failing_decode)
    with pytest.raises(error_type, match="simulated failure"):
        build_cache(listing, out, "demo", size=SIZE)
    assert len(calls) == 3
    assert out.read_bytes() == b"previous cache"
    assert leftover_temp_files(tmp_path) == []


def test_atomic_output_rename(tmp_path):
    target = tmp_path / "sub" / "result.txt"
    with atomic_output(target) as temp:
        assert temp.parent == target.parent
        assert temp.name.startswith("result.txt.tmp-")
        temp.write_text("done")
        assert not target.exists()
    assert target.read_text() == "done"

    with pytest.raises(FileNotFoundError, match="without writing"):
        with atomic_output(tmp_path / "never.txt"):
            pass
    assert not (tmp_path / "never.txt").exists()


# --- reading and checks ----------------------------------------------------------------------


def test_image_list_hash_definition():
    text = "a.png\t0\ttrain\nsub/b.png\t3\ttest\n"
    expected = hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert image_list_hash(["a.png", "sub/b.png"], np.array([0, 3], dtype=np.int16), ["train", "test"]) == expected
    assert image_list_hash(["a.png"], [1], ["train"]) != image_list_hash(["a.png"], [0], ["train"])
    with pytest.raises(ValueError, match="differ in length"):
        image_list_hash(["a.png"], [0, 1], ["train"])


def test_open_cache_rejects_other_files(tmp_path):
    text_file = tmp_path / "notes.h5"
    text_file.write_text("not hdf5")
    with pytest.raises(CacheFormatError, match="not an HDF5 file"):
        open_cache(text_file)

    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as handle:
        handle["images"] = np.zeros((1, 2, 2, 3), np.uint8)
    with pytest.raises(CacheFormatError, match="no 'format' attribute"):
        read_cache_index(plain)

    archive = tmp_path / "masks.h5"
    with h5py.File(archive, "w") as handle:
        handle.attrs["format"] = "slfer-mask-archive"
    with pytest.raises(CacheFormatError, match="has format 'slfer-mask-archive'"):
        open_cache(archive)


def test_open_cache_version_and_tampering(tmp_path):
    make_folder_tree(tmp_path / "data", per_split={"train": 1})
    listing = read_dataset("folder", tmp_path / "data")
    out = build_cache(listing, tmp_path / "cache.h5", "demo", size=SIZE)

    with h5py.File(out, "a") as handle:
        handle.attrs["format_version"] = 2
    with pytest.raises(CacheFormatError, match="format_version 2"):
        open_cache(out)

    with h5py.File(out, "a") as handle:
        handle.attrs["format_version"] = 1
        handle["labels"][0] = 6
    with pytest.raises(CacheFormatError, match="image_list_hash"):
        read_cache_index(out)


def test_build_cache_invalid_arguments(tmp_path):
    make_folder_tree(tmp_path / "data", per_split={"train": 1})
    listing = read_dataset("folder", tmp_path / "data")
    with pytest.raises(ValueError, match="dataset_name"):
        build_cache(listing, tmp_path / "c.h5", "", size=SIZE)
    with pytest.raises(ValueError, match="invalid image size 0"):
        build_cache(listing, tmp_path / "c.h5", "demo", size=0)
    with pytest.raises(ValueError, match="invalid on_bad"):
        build_cache(listing, tmp_path / "c.h5", "demo", size=SIZE, on_bad="drop")
    assert not (tmp_path / "c.h5").exists()
