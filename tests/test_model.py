"""Tests of the SLFER network and its variants on tiny CPU inputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision

from parsing.labels import EXPRESSIONS, FACE_PARTS_8
from slfer.losses import crop_top_n_labels, slfer_loss
from slfer.model import (
    BACKBONE_STRIDE,
    RESNET18_BLOCKS_PER_STAGE,
    RESNET18_STAGE_CHANNELS,
    ModelConfig,
    SEBasicBlock,
    build_model,
)
from slfer.variants import VARIANTS, get_variant, model_config_for

BATCH, SIZE = 2, 64  # 64 is a multiple of the backbone stride 32


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_batch(size: tuple[int, int] = (SIZE, SIZE), seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(BATCH, 3, *size, generator=generator)
    labels = torch.randint(0, len(EXPRESSIONS), (BATCH,), generator=generator)
    masks = torch.randint(0, len(FACE_PARTS_8), (BATCH, *size), generator=generator)
    return images, labels, masks


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(model_config_for(name))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_train_mode_output_shapes(name):
    variant = VARIANTS[name]
    model = build(name).train()
    images, _, _ = make_batch()

    outputs = model(images)

    expected = {"logits": (BATCH, len(EXPRESSIONS)), "features": (BATCH, model.feature_dim)}
    if variant.st:
        expected["seg"] = (BATCH, len(FACE_PARTS_8), SIZE, SIZE)
    if variant.ct:
        expected["ct"] = (BATCH, len(FACE_PARTS_8))
    assert {key: tuple(value.shape) for key, value in outputs.items()} == expected
    for key, value in outputs.items():
        assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("name", list(VARIANTS))
def test_eval_mode_runs_ect_only(name):
    model = build(name).eval()
    images, _, _ = make_batch()

    with torch.no_grad():
        outputs = model(images)

    assert set(outputs) == {"logits", "features"}
    assert outputs["logits"].shape == (BATCH, len(EXPRESSIONS))
    assert outputs["features"].shape == (BATCH, model.feature_dim)
    assert torch.isfinite(outputs["logits"]).all()


def test_classify_skips_auxiliary_heads_in_train_mode():
    model = build("proposed").train()
    images, _, _ = make_batch()

    outputs = model.classify(images)

    assert set(outputs) == {"logits", "features"}
    assert outputs["logits"].shape == (BATCH, len(EXPRESSIONS))


def test_classify_matches_forward_in_eval_mode():
    model = build("proposed").eval()
    images, _, _ = make_batch()

    with torch.no_grad():
        from_forward = model(images)
        from_classify = model.classify(images)

    torch.testing.assert_close(from_classify["logits"], from_forward["logits"])
    torch.testing.assert_close(from_classify["features"], from_forward["features"])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_parameter_gets_gradient(name):
    model = build(name).train()
    images, labels, masks = make_batch()

    outputs = model(images)
    total, _ = slfer_loss(outputs, labels, masks, crop_top_n_labels(masks, 4), lambda1=0.5, lambda2=0.5)
    total.backward()

    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{param_name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{param_name} has an all-zero gradient"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_has_only_its_parts(name):
    variant = VARIANTS[name]
    model = build(name)
    names = [param_name for param_name, _ in model.named_parameters()]

    assert (model.st_head is not None) == variant.st
    assert (model.ct_head is not None) == variant.ct
    assert any(n.startswith("st_head.") for n in names) == variant.st
    assert any(n.startswith("ct_head.") for n in names) == variant.ct
    assert any(".se." in n for n in names) == variant.se


def test_se_adds_expected_parameter_count():
    reduction = ModelConfig().se_reduction
    expected = 0
    for channels, blocks in zip(RESNET18_STAGE_CHANNELS, RESNET18_BLOCKS_PER_STAGE):
        squeezed = channels // reduction
        # fc1: C*C/r weights + C/r biases; fc2: C/r*C weights + C biases
        expected += blocks * (2 * channels * squeezed + squeezed + channels)

    without_se = sum(p.numel() for p in build("ct_st").parameters())
    with_se = sum(p.numel() for p in build("proposed").parameters())

    assert with_se - without_se == expected
    assert expected == 2 * (2 * 64 * 4 + 4 + 64) + 2 * (2 * 128 * 8 + 8 + 128) + 2 * (
        2 * 256 * 16 + 16 + 256
    ) + 2 * (2 * 512 * 32 + 32 + 512)


def test_backbone_keys_match_torchvision():
    torchvision_keys = set(torchvision.models.resnet18(weights=None).state_dict())
    torchvision_keys -= {"fc.weight", "fc.bias"}

    plain_keys = set(build("baseline").backbone.state_dict())
    se_keys = set(build("proposed").backbone.state_dict())

    assert plain_keys == torchvision_keys
    assert se_keys - torchvision_keys == {key for key in se_keys if ".se." in key}
    assert torchvision_keys <= se_keys


def test_backbone_matches_torchvision_resnet18():
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None).eval()
    model = build("baseline").eval()
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    model.backbone.load_state_dict(state)
    images, _, _ = make_batch()

    with torch.no_grad():
        _, layer4 = model.backbone(images)
        expected = reference.layer4(
            reference.layer3(
                reference.layer2(reference.layer1(reference.maxpool(reference.relu(reference.bn1(reference.conv1(images))))))
            )
        )

    torch.testing.assert_close(layer4, expected)


def test_se_scales_residual_branch_before_addition():
    torch.manual_seed(0)
    block = SEBasicBlock(8, 8, se_reduction=4).eval()
    x = torch.randn(2, 8, 6, 6)

    # Gates of 0 remove the residual branch: the block returns relu(identity).
    torch.nn.init.zeros_(block.se.fc2.weight)
    torch.nn.init.constant_(block.se.fc2.bias, -1e4)
    with torch.no_grad():
        closed = block(x)
    torch.testing.assert_close(closed, torch.relu(x))

    # Gates of 1 leave the branch untouched: the block equals torchvision's BasicBlock.
    torch.nn.init.constant_(block.se.fc2.bias, 1e4)
    plain = torchvision.models.resnet.BasicBlock(8, 8).eval()
    plain.load_state_dict({k: v for k, v in block.state_dict().items() if not k.startswith("se.")})
    with torch.no_grad():
        opened = block(x)
        expected = plain(x)
    torch.testing.assert_close(opened, expected)


@pytest.mark.parametrize("size", [(64, 64), (96, 32)])
def test_decoder_reaches_input_size_without_resize(size):
    assert size[0] % BACKBONE_STRIDE == 0
    assert size[1] % BACKBONE_STRIDE == 0
    model = build("st").train()
    images, _, _ = make_batch(size)
    classifier_outputs = []
    model.st_head.classifier.register_forward_hook(lambda module, inputs, output: classifier_outputs.append(output))

    model(images)

    # The 1x1 classifier already works at input resolution, so no final interpolation ran.
    assert classifier_outputs[0].shape[-2:] == size


@pytest.mark.parametrize("size", [(64, 96), (72, 56)])
def test_seg_output_at_input_resolution(size):
    model = build("st").train()
    images, _, _ = make_batch(size)

    seg = model(images)["seg"]

    assert seg.shape == (BATCH, len(FACE_PARTS_8), *size)


def test_channels_last_matches_contiguous():
    model = build("proposed").train()
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    images, _, _ = make_batch()

    torch.manual_seed(5)
    expected = model(images)
    torch.manual_seed(5)
    actual = model_cl(images.contiguous(memory_format=torch.channels_last))

    assert set(actual) == set(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-4, msg=key)


def test_autocast_bfloat16_forward_and_backward():
    model = build("proposed").train()
    images, labels, masks = make_batch()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(images)
        total, terms = slfer_loss(outputs, labels, masks, crop_top_n_labels(masks, 4), 0.5, 0.5)
    total.backward()

    assert outputs["seg"].dtype == torch.bfloat16
    assert total.dtype == torch.float32
    assert torch.isfinite(total)
    for key in ("ect", "st", "ct"):
        assert torch.isfinite(terms[key]), key
    assert all(p.grad is not None for p in model.parameters())


def test_head_layers_use_kaiming_init():
    torch.manual_seed(0)
    model = build_model(ModelConfig(ect_hidden=(512, 512)))
    hidden = model.ect_head.hidden[0]

    expected_std = (2.0 / hidden.in_features) ** 0.5  # ReLU gain, fan_in
    assert abs(hidden.weight.std().item() - expected_std) / expected_std < 0.05
    assert torch.count_nonzero(hidden.bias) == 0


def test_model_config_round_trip_through_json():
    config = model_config_for("proposed", ect_hidden=(64, 32), st_channels=(32, 16, 16, 8))

    restored = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))

    assert restored == config


def test_model_config_rejects_unknown_key():
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({"se": True, "ect_hiden": [64]})


@pytest.mark.parametrize(
    "overrides",
    [{"ect_hidden": ()}, {"st_channels": (8, 8, 8)}, {"ect_dropout": 1.0}, {"se": True, "se_reduction": 48}],
)
def test_model_config_rejects_invalid_widths(overrides):
    with pytest.raises(ValueError, match="invalid ModelConfig"):
        ModelConfig(**overrides)


def test_unknown_variant_lists_allowed_names():
    with pytest.raises(ValueError) as error:
        get_variant("ct+st")

    for name in VARIANTS:
        assert name in str(error.value)


def test_variant_flags_cannot_be_overridden():
    with pytest.raises(ValueError, match="set by the variant"):
        model_config_for("baseline", se=True)


def test_proposed_is_ct_st_with_se():
    assert VARIANTS["proposed"] == get_variant("proposed")
    assert (VARIANTS["proposed"].st, VARIANTS["proposed"].ct, VARIANTS["proposed"].se) == (True, True, True)
    assert (VARIANTS["ct_st"].st, VARIANTS["ct_st"].ct, VARIANTS["ct_st"].se) == (True, True, False)
    assert (VARIANTS["baseline"].st, VARIANTS["baseline"].ct, VARIANTS["baseline"].se) == (False, False, False)
