"""slfer-parse commands owned by the parser and archive code: parse, merge, derive, validate,
figure, download-weights and check-weights."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from facexlib.parsing.bisenet import BiSeNet
from PIL import Image

from parsing import cli
from parsing.archive import top_n_labels, validate_archive
from fakes_caches import write_random_cache
from parsing.labels import EXPRESSIONS

SIZE = 32


def write_cache(path: Path, count: int = 8, size: int = SIZE, dataset: str = "toy") -> Path:
    """Write an image cache with random pixels (see fakes_caches)."""
    return write_random_cache(path, count, size, dataset=dataset, test_every=4, extension="jpg")


def write_label_maps(root: Path, cache_path: Path) -> None:
    """Write a face-like 19-class label map for every image of the cache."""
    with h5py.File(cache_path, "r") as file:
        names = file["names"].asstr()[...]
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i, name in enumerate(names):
        label_map = np.zeros((SIZE, SIZE), np.uint8)
        label_map[(yy - 16) ** 2 + (xx - 16) ** 2 < (10 + i % 3) ** 2] = 1  # skin
        label_map[:6] = 17  # hair
        label_map[12:14, 10:14] = 4  # l_eye
        label_map[12:14, 18:22] = 5  # r_eye
        label_map[22:25, 13:19] = 12 + i % 2  # lips
        path = root / Path(name).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(label_map, mode="L").save(path)


def run(argv: list) -> int:
    return cli.main([str(item) for item in argv], command_modules=[cli])


def labels_parse_args(cache_path: Path, out: Path, labels_root: Path) -> list:
    return ["parse", "--cache", cache_path, "--out", out, "--backend", "labels", "--labels-root", labels_root]


@pytest.fixture
def cache_path(tmp_path: Path) -> Path:
    return write_cache(tmp_path / "cache.h5")


@pytest.fixture
def labels_root(tmp_path: Path, cache_path: Path) -> Path:
    write_label_maps(tmp_path / "labels", cache_path)
    return tmp_path / "labels"


@pytest.fixture
def archive_path(tmp_path: Path, cache_path: Path, labels_root: Path) -> Path:
    out = tmp_path / "masks.h5"
    assert run([*labels_parse_args(cache_path, out, labels_root), "--workers", 0]) == 0
    return out


@pytest.fixture(scope="module")
def weights_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "random_bisenet.pth"
    torch.save(BiSeNet(num_class=19).state_dict(), path)
    return path


def test_default_parser_has_all_commands():
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    expected = {
        "list", "cache", "synth", "synth-figure", "parse", "merge", "derive", "validate", "figure",
        "download-weights", "check-weights",
    }  # fmt: skip
    assert expected <= set(commands)


def test_parse_and_validate(archive_path: Path, cache_path: Path, capsys):
    assert run(["validate", "--archive", archive_path, "--cache", cache_path, "--check-content"]) == 0
    assert "matches image cache" in capsys.readouterr().out
    with h5py.File(archive_path, "r") as file:
        assert file.attrs["parser_backend"] == "labels"
        # Image 0: eyes cover 16 pixels, the lips 18, so mouth beats eye for the fourth place.
        assert file["topn"][0].tolist() == [1, 1, 0, 0, 0, 1, 0, 1]  # background, skin, mouth, hair


def test_validate_reports_differences(tmp_path: Path, archive_path: Path, capsys):
    other = write_cache(tmp_path / "other.h5", dataset="rafdb")
    assert run(["validate", "--archive", archive_path, "--cache", other]) == 1
    out = capsys.readouterr().out
    assert "does not match image cache" in out
    assert "  - dataset: archive 'toy' vs cache 'rafdb'" in out


def test_validate_missing_cache(tmp_path: Path, archive_path: Path, capsys):
    assert run(["validate", "--archive", archive_path, "--cache", tmp_path / "none.h5"]) == 1
    assert "image cache not found" in capsys.readouterr().err


def test_shards_merge_cli(tmp_path: Path, archive_path: Path, cache_path: Path, labels_root: Path):
    shards = []
    for index in range(3):
        shard = tmp_path / f"shard{index}.h5"
        assert run([*labels_parse_args(cache_path, shard, labels_root), "--workers", 0, "--shard", f"{index}/3"]) == 0
        shards.append(shard)
    merged = tmp_path / "merged.h5"
    assert run(["merge", "--out", merged, *reversed(shards)]) == 0
    with h5py.File(archive_path, "r") as single, h5py.File(merged, "r") as result:
        for key in single:
            assert np.array_equal(single[key][...], result[key][...]), key
        single_attrs = {k: v for k, v in single.attrs.items() if k != "created"}
        result_attrs = {k: v for k, v in result.attrs.items() if k != "created"}
        assert single_attrs == result_attrs


def test_merge_missing_shard_fails(tmp_path: Path, cache_path: Path, labels_root: Path, capsys):
    shard = tmp_path / "shard0.h5"
    assert run([*labels_parse_args(cache_path, shard, labels_root), "--workers", 0, "--shard", "0/2"]) == 0
    assert run(["merge", "--out", tmp_path / "merged.h5", shard]) == 1
    assert "shard(s) 1/2 missing" in capsys.readouterr().err
    assert not (tmp_path / "merged.h5").exists()


def test_derive_cli(tmp_path: Path, archive_path: Path, cache_path: Path):
    derived = tmp_path / "top2.h5"
    assert run(["derive", "--archive", archive_path, "--out", derived, "--top-n", 2]) == 0
    with h5py.File(derived, "r") as file:
        assert file.attrs["top_n"] == 2
        assert np.array_equal(file["topn"][...], top_n_labels(file["counts8"][...], 2))
    assert validate_archive(derived, cache_path, check_content=True) == []


def test_invalid_merge_argument(cache_path: Path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["parse", "--cache", cache_path, "--out", "x.h5", "--merge", "0,1,2"])
    assert exit_info.value.code == 2
    assert "must have 19 entries, got 3" in capsys.readouterr().err


def test_backend_option_conflict(tmp_path: Path, cache_path: Path, labels_root: Path, capsys):
    code = run([*labels_parse_args(cache_path, tmp_path / "x.h5", labels_root), "--weights", "w.pth"])
    assert code == 1
    assert "--weights applies to the bisenet backend only" in capsys.readouterr().err


def test_parse_bisenet_cli(tmp_path: Path, cache_path: Path, weights_path: Path):
    out = tmp_path / "bisenet.h5"
    argv = ["parse", "--cache", cache_path, "--out", out, "--weights", weights_path, "--input-size", 64]
    assert run([*argv, "--device", "cpu", "--precision", "fp32", "--batch-size", 3, "--workers", 0, "--top-n", 3]) == 0
    with h5py.File(out, "r") as file:
        assert file.attrs["parser_input_size"] == 64
        assert file.attrs["top_n"] == 3
        assert file.attrs["weights_sha256"] == hashlib.sha256(weights_path.read_bytes()).hexdigest()
    assert validate_archive(out, cache_path, check_content=True) == []


def test_parse_bisenet_missing_weights(tmp_path: Path, cache_path: Path, capsys):
    argv = ["parse", "--cache", cache_path, "--out", tmp_path / "x.h5", "--weights", tmp_path / "missing.pth", "--device", "cpu"]
    assert run(argv) == 1
    err = capsys.readouterr().err
    assert "BiSeNet weights not found" in err
    assert "slfer-parse download-weights" in err
    assert not (tmp_path / "x.h5").exists()


def test_figure_cli(tmp_path: Path, archive_path: Path, cache_path: Path):
    out = tmp_path / "figures" / "figure5.png"
    assert run(["figure", "--archive", archive_path, "--cache", cache_path, "--out", out, "--count", 5, "--columns", 3]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.width > 200
        assert image.height > 200
    assert [p.name for p in out.parent.iterdir()] == ["figure5.png"]


def test_figure_rejects_mismatched_cache(tmp_path: Path, archive_path: Path, capsys):
    other = write_cache(tmp_path / "other.h5", size=SIZE * 2)
    out = tmp_path / "figure5.png"
    assert run(["figure", "--archive", archive_path, "--cache", other, "--out", out]) == 1
    assert "mask size 32 differs from the cache image size 64" in capsys.readouterr().err
    assert not out.exists()


def test_download_weights_file_url(tmp_path: Path, weights_path: Path, capsys):
    out = tmp_path / "resources" / "parsing_bisenet.pth"
    assert run(["download-weights", "--out", out, "--url", weights_path.as_uri()]) == 0
    sha256 = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    assert out.read_bytes() == weights_path.read_bytes()
    assert sha256 in capsys.readouterr().out
    assert (out.parent / "parsing_bisenet.pth.sha256").read_text() == f"{sha256}  parsing_bisenet.pth\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["parsing_bisenet.pth", "parsing_bisenet.pth.sha256"]

    assert run(["check-weights", "--weights", out, "--sha256", sha256]) == 0
    assert "loads strictly into BiSeNet" in capsys.readouterr().out


def test_download_weights_rejects_bad_file(tmp_path: Path, capsys):
    source = tmp_path / "source" / "broken.pth"
    source.parent.mkdir()
    torch.save({"conv.weight": torch.zeros(3)}, source)
    out = tmp_path / "resources" / "parsing_bisenet.pth"
    assert run(["download-weights", "--out", out, "--url", source.as_uri()]) == 1
    err = capsys.readouterr().err
    assert f"the file downloaded from {source.as_uri()} is not usable" in err
    assert "unexpected key(s): conv.weight" in err
    assert list(out.parent.iterdir()) == []


def test_download_weights_wrong_checksum(tmp_path: Path, weights_path: Path, capsys):
    out = tmp_path / "parsing_bisenet.pth"
    assert run(["download-weights", "--out", out, "--url", weights_path.as_uri(), "--sha256", "0" * 64]) == 1
    assert f"expected {'0' * 64}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_download_weights_missing_url(tmp_path: Path, capsys):
    out = tmp_path / "parsing_bisenet.pth"
    assert run(["download-weights", "--out", out, "--url", (tmp_path / "absent.pth").as_uri()]) == 1
    assert "download of file://" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_check_weights_rejects_random_file(tmp_path: Path, capsys):
    path = tmp_path / "w.pth"
    path.write_bytes(b"\x00" * 100)
    assert run(["check-weights", "--weights", path]) == 1
    assert "not a readable PyTorch weights file" in capsys.readouterr().err
