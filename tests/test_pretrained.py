"""Tests of pretrained backbone loading with checkpoints built from a torchvision ResNet-18."""

from __future__ import annotations

import json
import logging
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models import ResNet18_Weights

from slfer.model import build_model
from slfer.pretrained import BackboneWeightsError, LoadReport, load_backbone_weights
from slfer.variants import model_config_for

# ResNet-18 without fc: 20 conv weights, 20 BN layers with weight, bias, running_mean and
# running_var (80), so 100 required tensors, plus 20 optional num_batches_tracked counters.
NUM_BACKBONE_TENSORS = 100
NUM_BN_LAYERS = 20


class NotATensor:
    """A pickled object that ``torch.load(weights_only=True)`` must reject."""


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def source_state() -> dict[str, torch.Tensor]:
    """A torchvision resnet18 state dict whose every tensor differs from a fresh initialisation."""
    torch.manual_seed(123)
    state = torchvision.models.resnet18(weights=None).state_dict()
    for key, value in state.items():
        if key.endswith("running_var"):
            state[key] = torch.rand_like(value) + 0.5
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000)
        else:
            state[key] = torch.randn_like(value)
    return state


def save_checkpoint(path: Path, state: dict) -> Path:
    torch.save({"state_dict": state}, path)
    return path


def data_parallel_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Build the RAN/SCN layout: every key prefixed ``module.``, plus ``feature`` and a 7-way ``fc``."""
    converted = {f"module.{key}": value for key, value in state.items() if not key.startswith("fc.")}
    converted["module.feature.weight"] = torch.randn(256, 512)
    converted["module.feature.bias"] = torch.randn(256)
    converted["module.fc.weight"] = torch.randn(7, 256)
    converted["module.fc.bias"] = torch.randn(7)
    return converted


def fresh_model(name: str = "proposed"):
    torch.manual_seed(0)
    return build_model(model_config_for(name))


def assert_backbone_equals(model, state: dict[str, torch.Tensor]) -> None:
    for key, value in model.backbone.state_dict().items():
        if ".se." in key:
            continue
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)


def test_torchvision_key_checkpoint_loads_every_tensor(tmp_path, source_state):
    path = save_checkpoint(tmp_path / "resnet18_msceleb.pth", source_state)
    model = fresh_model()

    report = load_backbone_weights(model, path)

    assert report.checkpoint_format == "torchvision"
    assert report.num_loaded == NUM_BACKBONE_TENSORS
    assert report.num_backbone_tensors == NUM_BACKBONE_TENSORS
    assert report.missing_optional == []
    assert dict(report.skipped) == {"fc.weight": "not a backbone key", "fc.bias": "not a backbone key"}
    assert_backbone_equals(model, source_state)


def test_data_parallel_checkpoint_loads_every_tensor(tmp_path, source_state):
    path = save_checkpoint(tmp_path / "ijba_res18_naive.pth.tar", data_parallel_checkpoint(source_state))
    model = fresh_model()

    report = load_backbone_weights(model, path)

    assert report.checkpoint_format == "data_parallel"
    assert report.num_loaded == NUM_BACKBONE_TENSORS
    assert {key for key, _ in report.skipped} == {"feature.weight", "feature.bias", "fc.weight", "fc.bias"}
    assert_backbone_equals(model, source_state)


def test_legacy_serialisation_format_loads(tmp_path, source_state):
    # Checkpoints from 2019 predate the zip format that torch.save writes since PyTorch 1.6.
    path = tmp_path / "ijba_res18_naive.pth.tar"
    torch.save({"state_dict": data_parallel_checkpoint(source_state)}, path, _use_new_zipfile_serialization=False)
    model = fresh_model()

    report = load_backbone_weights(model, path)

    assert report.num_loaded == NUM_BACKBONE_TENSORS
    assert_backbone_equals(model, source_state)


def test_both_formats_give_identical_backbones(tmp_path, source_state):
    plain_path = save_checkpoint(tmp_path / "resnet18_msceleb.pth", source_state)
    prefixed_path = save_checkpoint(tmp_path / "ijba_res18_naive.pth.tar", data_parallel_checkpoint(source_state))
    plain_model, prefixed_model = fresh_model(), fresh_model()

    load_backbone_weights(plain_model, plain_path)
    load_backbone_weights(prefixed_model, prefixed_path)

    plain, prefixed = plain_model.backbone.state_dict(), prefixed_model.backbone.state_dict()
    assert plain.keys() == prefixed.keys()
    for key in plain:
        torch.testing.assert_close(plain[key], prefixed[key], rtol=0, atol=0, msg=key)


def test_loaded_backbone_computes_torchvision_features(tmp_path, source_state):
    path = save_checkpoint(tmp_path / "resnet18_msceleb.pth", source_state)
    model = fresh_model("baseline").eval()
    reference = torchvision.models.resnet18(weights=None).eval()
    reference.load_state_dict(source_state)
    reference.fc = torch.nn.Identity()
    images = torch.randn(2, 3, 64, 64)

    load_backbone_weights(model, path)
    with torch.no_grad():
        _, layer4 = model.backbone(images)
        expected = reference(images)

    torch.testing.assert_close(layer4.mean(dim=(2, 3)), expected)


def test_se_and_heads_keep_fresh_weights(tmp_path, source_state):
    path = save_checkpoint(tmp_path / "resnet18_msceleb.pth", source_state)
    model = fresh_model()
    before = {key: value.clone() for key, value in model.state_dict().items() if not key.startswith("backbone.")}
    before.update({key: value.clone() for key, value in model.state_dict().items() if ".se." in key})

    load_backbone_weights(model, path)

    after = model.state_dict()
    assert any(".se." in key for key in before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)


def test_missing_num_batches_tracked_is_optional(tmp_path, source_state):
    state = {key: value for key, value in source_state.items() if not key.endswith("num_batches_tracked")}
    path = save_checkpoint(tmp_path / "old.pth", state)
    model = fresh_model()

    report = load_backbone_weights(model, path)

    assert report.num_loaded == NUM_BACKBONE_TENSORS
    assert len(report.missing_optional) == NUM_BN_LAYERS
    assert all(key.endswith("num_batches_tracked") for key in report.missing_optional)


def test_bare_state_dict_loads(tmp_path, source_state):
    path = tmp_path / "bare.pth"
    torch.save(source_state, path)
    model = fresh_model()

    report = load_backbone_weights(model, path)

    assert report.num_loaded == NUM_BACKBONE_TENSORS
    assert_backbone_equals(model, source_state)


@pytest.mark.parametrize("prefix", ["backbone.", "base.", "module.base."])
def test_wrong_key_prefix_fails_loudly(tmp_path, source_state, prefix):
    path = save_checkpoint(tmp_path / "renamed.pth", {prefix + key: value for key, value in source_state.items()})
    model = fresh_model()

    with pytest.raises(BackboneWeightsError, match=f"provides 0 of the {NUM_BACKBONE_TENSORS} backbone tensors"):
        load_backbone_weights(model, path)


def test_one_missing_tensor_fails_and_names_it(tmp_path, source_state):
    state = dict(source_state)
    del state["layer4.1.bn2.running_var"]
    path = save_checkpoint(tmp_path / "partial.pth", state)

    with pytest.raises(BackboneWeightsError) as error:
        load_backbone_weights(fresh_model(), path)

    assert f"provides {NUM_BACKBONE_TENSORS - 1} of the {NUM_BACKBONE_TENSORS}" in str(error.value)
    assert "layer4.1.bn2.running_var" in str(error.value)


def test_shape_mismatch_fails_and_names_shapes(tmp_path, source_state):
    state = dict(source_state)
    state["conv1.weight"] = torch.randn(64, 1, 7, 7)  # a grayscale stem
    path = save_checkpoint(tmp_path / "gray.pth", state)

    with pytest.raises(BackboneWeightsError) as error:
        load_backbone_weights(fresh_model(), path)

    assert "conv1.weight" in str(error.value)
    assert "shape mismatch: checkpoint (64, 1, 7, 7), backbone (64, 3, 7, 7)" in str(error.value)


def test_missing_file_explains_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_backbone_weights(fresh_model(), tmp_path / "resnet18_msceleb.pth")

    message = str(error.value)
    assert "resnet18_msceleb.pth" in message
    assert "DAN" in message
    assert "ijba_res18_naive.pth.tar" in message
    assert "SCN" in message
    assert "--backbone-weights imagenet" in message
    assert "--backbone-weights none" in message


def test_corrupt_file_fails_with_path(tmp_path):
    path = tmp_path / "truncated.pth"
    path.write_bytes(b"not a checkpoint")

    with pytest.raises(BackboneWeightsError, match="could not read backbone checkpoint .*truncated.pth"):
        load_backbone_weights(fresh_model(), path)


def test_pickled_objects_are_rejected(tmp_path, source_state):
    path = tmp_path / "with_object.pth"
    torch.save({"state_dict": source_state, "extra": NotATensor()}, path)

    with pytest.raises(BackboneWeightsError, match="weights_only=True"):
        load_backbone_weights(fresh_model(), path)


def test_unknown_layout_fails(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)

    with pytest.raises(BackboneWeightsError, match="contains neither"):
        load_backbone_weights(fresh_model(), path)


def test_none_keeps_random_initialisation():
    model = fresh_model()
    before = {key: value.clone() for key, value in model.state_dict().items()}

    report = load_backbone_weights(model, "none")

    assert report.checkpoint_format == "none"
    assert report.num_loaded == 0
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


def reject_download(url, *args, **kwargs):
    raise urllib.error.URLError(f"tests have no network ({url})")


def test_imagenet_reads_torch_hub_cache(tmp_path, monkeypatch, source_state):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", reject_download)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(source_state, cache / Path(ResNet18_Weights.IMAGENET1K_V1.url).name)
    model = fresh_model()

    report = load_backbone_weights(model, "imagenet")

    assert report.checkpoint_format == "imagenet"
    assert report.num_loaded == NUM_BACKBONE_TENSORS
    assert len(report.sha256) == 64
    assert_backbone_equals(model, source_state)


def test_imagenet_download_failure_explains_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", reject_download)

    with pytest.raises(BackboneWeightsError) as error:
        load_backbone_weights(fresh_model(), "imagenet")

    message = str(error.value)
    assert ResNet18_Weights.IMAGENET1K_V1.url in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "--backbone-weights none" in message


def test_report_is_json_serialisable_and_logged(tmp_path, source_state, caplog):
    path = save_checkpoint(tmp_path / "resnet18_msceleb.pth", source_state)

    with caplog.at_level(logging.INFO, logger="slfer.pretrained"):
        report = load_backbone_weights(fresh_model(), path)

    values = json.loads(json.dumps(report.to_dict()))
    assert values["num_loaded"] == NUM_BACKBONE_TENSORS
    assert {"key": "fc.weight", "reason": "not a backbone key"} in values["skipped"]
    assert isinstance(report, LoadReport)
    assert f"loaded {NUM_BACKBONE_TENSORS} of {NUM_BACKBONE_TENSORS} backbone tensors" in caplog.text
    assert "skipped checkpoint key fc.weight: not a backbone key" in caplog.text
