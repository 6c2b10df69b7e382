"""Parser backends: BiSeNet preprocessing and strict weight loading, label maps, the parse loop."""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from facexlib.parsing.bisenet import BiSeNet
from PIL import Image

from parsing.archive import load_split, merge_masks, read_cache_info, validate_archive
from fakes_caches import write_cache_file
from parsing.labels import DEFAULT_MERGE_19_TO_8, EXPRESSIONS
from parsing.parsers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BiSeNetParser,
    LabelMapParser,
    parse_cache,
    preprocess_batch,
    resize_label_map,
    resize_labels_nearest,
    resolve_device,
    resolve_precision,
)
from parsing.weights import FACEXLIB_BISENET_URL, WeightsError, build_bisenet, read_state_dict

SIZE = 32
INPUT_SIZE = 64


def write_cache(path: Path, count: int = 6, size: int = SIZE) -> Path:
    """Write an image cache in the slfer-image-cache format (version 1) from crops of a real photograph."""
    from skimage import data

    photo = data.astronaut()  # 512x512 RGB, public domain
    crops = [photo[40 * i : 40 * i + 300, 60:360] for i in range(count)]
    images = np.stack([cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA) for crop in crops])
    labels = np.arange(count, dtype=np.int16) % len(EXPRESSIONS)
    splits = ["train" if i % 2 else "test" for i in range(count)]
    names = [f"{split}/{EXPRESSIONS[label]}/img{i}.jpg" for i, (label, split) in enumerate(zip(labels, splits))]
    return write_cache_file(path, images, names, labels, splits)


@functools.cache
def _random_bisenet_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = BiSeNet(num_class=19)
    # Non-trivial batch-norm statistics, so that a loader that skipped buffers would change outputs.
    for name, buffer in model.named_buffers():
        if name.endswith("running_var"):
            buffer.uniform_(0.5, 2.0)
        elif name.endswith("running_mean"):
            buffer.normal_(0.0, 0.1)
    return model.state_dict()


def random_bisenet_state() -> dict[str, torch.Tensor]:
    """Return a fresh dict (shared tensors) of one randomly initialised BiSeNet's state."""
    return dict(_random_bisenet_state())


@pytest.fixture(scope="module")
def weights_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "bisenet_random.pth"
    torch.save(random_bisenet_state(), path)
    return path


@pytest.fixture
def cache_path(tmp_path: Path) -> Path:
    return write_cache(tmp_path / "cache.h5")


# ---------------------------------------------------------------------------------------------
# Preprocessing


def reference_preprocess(image: np.ndarray, input_size: int) -> np.ndarray:
    """Preprocess one RGB uint8 image with OpenCV: cv2.resize (INTER_LINEAR), /255, ImageNet mean and std."""
    resized = cv2.resize(image, (input_size, input_size), interpolation=cv2.INTER_LINEAR)
    normalised = (resized.astype(np.float32) / 255.0 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return normalised.transpose(2, 0, 1)  # [3, I, I]


def grey_level_difference(batched: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Convert a difference of normalised inputs back to 0..255 grey levels."""
    return np.abs(batched - reference) * np.array(IMAGENET_STD)[None, :, None, None] * 255


@pytest.mark.parametrize("size, input_size", [(32, 64), (48, 128), (64, 64)])
def test_preprocess_enlarging_matches_cv2(size: int, input_size: int):
    images = np.random.default_rng(size).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    batched = preprocess_batch(torch.from_numpy(images), input_size).numpy()
    assert batched.shape == (3, 3, input_size, input_size)
    reference = np.stack([reference_preprocess(image, input_size) for image in images])
    # OpenCV rounds the resized image to uint8 (up to half a level) after interpolating with
    # 11-bit fixed-point weights, so the two stay within one grey level. Sampling at pixel
    # corners (align_corners=True) instead would differ by tens of levels.
    difference = grey_level_difference(batched, reference)
    assert difference.max() < 1.0
    assert difference.mean() < 0.35


@pytest.mark.parametrize("size, input_size", [(100, 64), (200, 64)])
def test_preprocess_shrinking_matches_pil(size: int, input_size: int):
    images = np.random.default_rng(size).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    batched = preprocess_batch(torch.from_numpy(images), input_size).numpy()
    resized = [np.asarray(Image.fromarray(image).resize((input_size, input_size), Image.BILINEAR)) for image in images]
    reference = np.stack(
        [((image / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1) for image in resized]
    )
    # PIL rounds its uint8 output too; without antialiasing the difference would exceed 60 levels.
    difference = grey_level_difference(batched, reference)
    assert difference.max() <= 1.0 + 1e-4
    assert difference.mean() < 0.35


def test_preprocess_rejects_wrong_layout():
    with pytest.raises(ValueError, match="uint8 \\[B, H, W, 3\\]"):
        preprocess_batch(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 64)


def test_nearest_resizes_agree():
    labels = np.random.default_rng(0).integers(0, 19, (2, 64, 48), dtype=np.uint8)
    for height, width in ((32, 32), (100, 70), (64, 48)):
        resized = resize_labels_nearest(torch.from_numpy(labels), height, width).numpy()
        assert resized.dtype == np.uint8
        for i in range(2):
            assert (resized[i] == resize_label_map(labels[i], height, width)).all()


def test_resolve_device_and_precision():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="invalid device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


# ---------------------------------------------------------------------------------------------
# Weights


def test_weights_load_strictly(weights_path: Path):
    model, sha256 = build_bisenet(weights_path)
    expected = random_bisenet_state()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert len(sha256) == 64
    assert not model.training


def test_weights_missing_file(tmp_path: Path):
    with pytest.raises(WeightsError, match="BiSeNet weights not found") as error:
        build_bisenet(tmp_path / "nothing.pth")
    assert FACEXLIB_BISENET_URL in str(error.value)
    assert "slfer-parse download-weights" in str(error.value)


def test_weights_missing_keys(tmp_path: Path):
    state = random_bisenet_state()
    del state["cp.resnet.conv1.weight"]
    del state["conv_out.conv_out.weight"]
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match="2 missing key\\(s\\): conv_out.conv_out.weight, cp.resnet.conv1.weight"):
        build_bisenet(tmp_path / "w.pth")


def test_weights_unexpected_keys(tmp_path: Path):
    state = random_bisenet_state()
    state["head.extra"] = torch.zeros(2)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match="1 unexpected key\\(s\\): head.extra"):
        build_bisenet(tmp_path / "w.pth")


def test_weights_wrong_shape(tmp_path: Path):
    state = random_bisenet_state()
    state["conv_out.conv_out.weight"] = torch.zeros(17, 256, 1, 1)  # a 17-class head
    torch.save(state, tmp_path / "w.pth")
    expected = r"1 shape mismatch\(es\): conv_out.conv_out.weight \[17, 256, 1, 1\] \(expected \[19, 256, 1, 1\]\)"
    with pytest.raises(WeightsError, match=expected):
        build_bisenet(tmp_path / "w.pth")


@pytest.mark.parametrize("content", [[torch.zeros(2)], torch.zeros(3), {}, {"epoch": 3}])
def test_weights_not_a_state_dict(tmp_path: Path, content):
    torch.save(content, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match="does not contain a state_dict"):
        build_bisenet(tmp_path / "w.pth")


def test_weights_not_a_torch_file(tmp_path: Path):
    (tmp_path / "w.pth").write_text("<html>404 Not Found</html>")
    with pytest.raises(WeightsError, match="not a readable PyTorch weights file"):
        build_bisenet(tmp_path / "w.pth")


def test_weights_wrapped_and_prefixed(tmp_path: Path):
    state = random_bisenet_state()
    torch.save({"state_dict": {f"module.{key}": value for key, value in state.items()}, "epoch": 5}, tmp_path / "w.pth")
    loaded = read_state_dict(tmp_path / "w.pth")
    assert set(loaded) == set(state)
    model, _ = build_bisenet(tmp_path / "w.pth")
    assert torch.equal(model.state_dict()["conv_out.conv_out.weight"], state["conv_out.conv_out.weight"])


# ---------------------------------------------------------------------------------------------
# BiSeNet end to end


def test_bisenet_parse_end_to_end(tmp_path: Path, cache_path: Path, weights_path: Path):
    parser = BiSeNetParser(weights_path, input_size=INPUT_SIZE, device="cpu")
    out = parse_cache(cache_path, tmp_path / "masks.h5", parser, batch_size=4, workers=0)
    assert validate_archive(out, cache_path, check_content=True) == []

    # Reference: the same model run image by image on the cv2-preprocessed input, taking the
    # argmax of the first output and a nearest resize back to the cache size.
    model, sha256 = build_bisenet(weights_path)
    with h5py.File(cache_path, "r") as file:
        images = file["images"][...]
    with torch.inference_mode():
        reference = []
        for image in images:
            logits = model(torch.from_numpy(reference_preprocess(image, INPUT_SIZE))[None])[0]
            reference.append(resize_label_map(logits.argmax(dim=1)[0].numpy().astype(np.uint8), SIZE, SIZE))
    reference = np.stack(reference)

    with h5py.File(out, "r") as file:
        masks19 = file["masks19"][...]
        attrs = dict(file.attrs)
    # The batched and reference inputs differ by under one grey level, which may flip the
    # argmax at a few near-tied pixels.
    assert (masks19 == reference).mean() > 0.99
    assert len(np.unique(masks19)) > 1
    assert attrs["parser_backend"] == "bisenet"
    assert attrs["weights_sha256"] == sha256
    assert attrs["parser_input_size"] == INPUT_SIZE
    assert attrs["parser_precision"] == "fp32"

    data = load_split(cache_path, out, split="train")
    assert (data.masks8 == merge_masks(masks19[1::2], DEFAULT_MERGE_19_TO_8)).all()


def test_bisenet_workers_match_main_process(tmp_path: Path, cache_path: Path, weights_path: Path):
    parser = BiSeNetParser(weights_path, input_size=INPUT_SIZE, device="cpu", channels_last=False)
    in_process = parse_cache(cache_path, tmp_path / "a.h5", parser, batch_size=4, workers=0)
    with_workers = parse_cache(cache_path, tmp_path / "b.h5", parser, batch_size=4, workers=1)
    with h5py.File(in_process, "r") as a, h5py.File(with_workers, "r") as b:
        assert np.array_equal(a["masks19"][...], b["masks19"][...])


def test_bisenet_rejects_bad_input_size(weights_path: Path):
    with pytest.raises(ValueError, match="multiple of 32"):
        BiSeNetParser(weights_path, input_size=100, device="cpu")


def test_interrupted_parse_leaves_nothing(tmp_path: Path, cache_path: Path, weights_path: Path, monkeypatch):
    parser = BiSeNetParser(weights_path, input_size=INPUT_SIZE, device="cpu")
    original = parser.parse_batch
    calls = []

    def crash_on_second_batch(images, names=()):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(images, names)

    monkeypatch.setattr(parser, "parse_batch", crash_on_second_batch)
    out_dir = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        parse_cache(cache_path, out_dir / "masks.h5", parser, batch_size=2, workers=0)
    assert calls == [2, 2]
    assert list(out_dir.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Label maps


def write_label_maps(root: Path, cache_path: Path, size: int) -> dict[str, np.ndarray]:
    cache = read_cache_info(cache_path)
    rng = np.random.default_rng(5)
    maps = {}
    for name in cache.names:
        label_map = rng.integers(0, 19, (size, size), dtype=np.uint8)
        path = root / Path(name).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(label_map, mode="L").save(path)
        maps[name] = label_map
    return maps


def test_labels_backend_round_trip(tmp_path: Path, cache_path: Path):
    maps = write_label_maps(tmp_path / "labels", cache_path, SIZE)
    out = parse_cache(cache_path, tmp_path / "masks.h5", LabelMapParser(tmp_path / "labels"), batch_size=4, workers=0)
    cache = read_cache_info(cache_path)
    with h5py.File(out, "r") as file:
        masks19 = file["masks19"][...]
        attrs = dict(file.attrs)
    assert all((masks19[i] == maps[name]).all() for i, name in enumerate(cache.names))
    assert attrs["parser_backend"] == "labels"
    assert attrs["weights_sha256"] == ""
    assert attrs["parser_input_size"] == 0
    assert str(tmp_path / "labels") in attrs["labels_source"]
    assert validate_archive(out, cache_path, check_content=True) == []


def test_labels_backend_resizes(tmp_path: Path, cache_path: Path):
    maps = write_label_maps(tmp_path / "labels", cache_path, SIZE * 2 + 3)
    parser = LabelMapParser(tmp_path / "labels")
    name = read_cache_info(cache_path).names[0]
    masks = parser.parse_batch(np.zeros((1, SIZE, SIZE, 3), np.uint8), [name])
    assert masks.shape == (1, SIZE, SIZE)
    assert (masks[0] == resize_label_map(maps[name], SIZE, SIZE)).all()


def test_labels_backend_value_out_of_range(tmp_path: Path, cache_path: Path):
    write_label_maps(tmp_path / "labels", cache_path, SIZE)
    name = read_cache_info(cache_path).names[3]
    bad = tmp_path / "labels" / Path(name).with_suffix(".png")
    Image.fromarray(np.full((SIZE, SIZE), 19, np.uint8), mode="L").save(bad)
    with pytest.raises(ValueError, match=f"label map {bad} contains class id 19"):
        parse_cache(cache_path, tmp_path / "masks.h5", LabelMapParser(tmp_path / "labels"), workers=0)
    assert not (tmp_path / "masks.h5").exists()


def test_labels_backend_missing_file(tmp_path: Path, cache_path: Path):
    write_label_maps(tmp_path / "labels", cache_path, SIZE)
    name = read_cache_info(cache_path).names[2]
    missing = tmp_path / "labels" / Path(name).with_suffix(".png")
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=f"label map not found: {missing}"):
        parse_cache(cache_path, tmp_path / "masks.h5", LabelMapParser(tmp_path / "labels"), workers=0)


def test_labels_backend_rejects_colour_png(tmp_path: Path, cache_path: Path):
    write_label_maps(tmp_path / "labels", cache_path, SIZE)
    name = read_cache_info(cache_path).names[0]
    path = tmp_path / "labels" / Path(name).with_suffix(".png")
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(path)
    with pytest.raises(ValueError, match="has PIL mode RGB; expected a single-channel 8-bit PNG"):
        LabelMapParser(tmp_path / "labels").parse_batch(np.zeros((1, SIZE, SIZE, 3), np.uint8), [name])
