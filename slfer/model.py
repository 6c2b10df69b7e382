"""The SLFER multi-task network: a ResNet-18 backbone with ECT, ST and CT heads.

- ECT (expression classification task): global average pooling over layer4, then
  three fully connected layers to the expression logits. This is the only head
  that runs in eval mode and the only one used for reported results.
- ST (segmentation task): a small decoder from layer3 and layer4 to per-pixel
  logits over the 8 coarse face parts, at input resolution.
- CT (component classification task): global average pooling, then two fully
  connected layers to one logit per coarse face part, trained with binary
  cross-entropy against the multi-hot labels of the n largest parts.
- SE: squeeze-and-excitation (Hu et al., "Squeeze-and-Excitation Networks",
  CVPR 2018) on the residual branch of every BasicBlock.

The SLFER paper fixes the number of layers of each head but not their widths.
The widths in ``ModelConfig`` are this project's choices, stored in every
run's config so that a run can be rebuilt.

The backbone keeps torchvision's ``resnet18`` module names (``conv1``, ``bn1``,
``layer1`` .. ``layer4``, and ``conv1``, ``bn1``, ``conv2``, ``bn2``,
``downsample.0``/``downsample.1`` inside each block), so torchvision and
MS-Celeb-1M checkpoints load by name (see ``slfer.pretrained``). SE parameters
live under the extra name ``se`` inside each block.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, conv1x1

from parsing.labels import EXPRESSIONS, FACE_PARTS_8

# Channels of ResNet-18's layer1..layer4 outputs; two BasicBlocks per stage.
RESNET18_STAGE_CHANNELS: tuple[int, ...] = (64, 128, 256, 512)
RESNET18_BLOCKS_PER_STAGE: tuple[int, ...] = (2, 2, 2, 2)

# The backbone reduces the input size by this factor at layer4 (stem x4, then
# layer2..layer4 x2 each). The ST decoder returns to input resolution exactly
# when the input height and width are multiples of it.
BACKBONE_STRIDE = 32


@dataclass(frozen=True)
class ModelConfig:
    """Switches for the optional heads and SE blocks, and the widths of the new layers.

    Defaults (this project's choices, the paper states none of the widths):
    ECT 512 -> 256 -> 128 -> 7 with ReLU after each hidden layer and dropout
    0.3 before the output layer. Its ``features`` output is the 128-d
    activation before that dropout. CT 512 -> 256 -> 8 with ReLU and dropout
    0.3 before the output layer. ST decoder widths 256, 128, 64, 32: one for the
    block after the layer3/layer4 concatenation, one per upsampling pair. SE
    reduction 16 as in Hu et al. The ECT and CT heads use no batch
    normalisation, so a training batch of one image still works.
    """

    se: bool = False
    st: bool = False
    ct: bool = False
    num_expressions: int = len(EXPRESSIONS)
    num_parts: int = len(FACE_PARTS_8)
    se_reduction: int = 16
    # Hidden widths of the ECT head: two entries give the paper's three FC layers.
    ect_hidden: tuple[int, ...] = (256, 128)
    ect_dropout: float = 0.3
    ct_hidden: int = 256
    ct_dropout: float = 0.3
    # Output channels of the ST decoder's four conv + BN + ReLU blocks.
    st_channels: tuple[int, int, int, int] = (256, 128, 64, 32)

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists; store tuples so the config stays hashable.
        object.__setattr__(self, "ect_hidden", tuple(int(w) for w in self.ect_hidden))
        object.__setattr__(self, "st_channels", tuple(int(w) for w in self.st_channels))
        self._validate()

    def _validate(self) -> None:
        problems = []
        if self.num_expressions < 2:
            problems.append(f"num_expressions={self.num_expressions} must be at least 2")
        if self.num_parts < 2:
            problems.append(f"num_parts={self.num_parts} must be at least 2")
        if not self.ect_hidden or any(w < 1 for w in self.ect_hidden):
            problems.append(f"ect_hidden={self.ect_hidden} must list at least one positive width")
        if self.ct_hidden < 1:
            problems.append(f"ct_hidden={self.ct_hidden} must be positive")
        if len(self.st_channels) != 4 or any(w < 1 for w in self.st_channels):
            problems.append(f"st_channels={self.st_channels} must list 4 positive widths")
        for name in ("ect_dropout", "ct_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                problems.append(f"{name}={value} must be in [0, 1)")
        if self.se:
            for channels in RESNET18_STAGE_CHANNELS:
                if self.se_reduction < 1 or channels % self.se_reduction != 0:
                    problems.append(
                        f"se_reduction={self.se_reduction} must divide every stage width "
                        f"{RESNET18_STAGE_CHANNELS}"
                    )
                    break
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Return the config as JSON-friendly values (tuples become lists)."""
        values = dataclasses.asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build a config from ``to_dict`` output; unknown keys raise ``ValueError``."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)


class SqueezeExcitation(nn.Module):
    """Channel attention: global average pool, FC C -> C/r, ReLU, FC C/r -> C, sigmoid.

    Both FC layers have biases, so one module has 2*C*C/r + C/r + C parameters.
    """

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        squeezed = channels // reduction
        self.fc1 = nn.Linear(channels, squeezed)
        self.fc2 = nn.Linear(squeezed, channels)

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, C, H, W] -> per-channel weights [B, C, 1, 1]
        weights = x.mean(dim=(2, 3))
        weights = torch.sigmoid(self.fc2(F.relu(self.fc1(weights))))
        return x * weights[:, :, None, None]


class SEBasicBlock(BasicBlock):
    """torchvision's BasicBlock with optional SE on the residual branch.

    SE rescales the branch output after ``bn2`` and before the identity is
    added, as in Hu et al. The parameter names of BasicBlock stay unchanged, and
    with ``se_reduction=None`` the block computes exactly what BasicBlock does.
    """

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        se_reduction: int | None = None,
    ) -> None:
        super().__init__(inplanes, planes, stride=stride, downsample=downsample)
        self.se = SqueezeExcitation(planes, se_reduction) if se_reduction else None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        return self.relu(out + identity)


class ResNet18Backbone(nn.Module):
    """ResNet-18 up to layer4 with torchvision's module names and no ``avgpool``/``fc``."""

    def __init__(self, se_reduction: int | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        inplanes = 64
        for index, (planes, blocks) in enumerate(zip(RESNET18_STAGE_CHANNELS, RESNET18_BLOCKS_PER_STAGE)):
            stride = 1 if index == 0 else 2
            layer = self._make_layer(inplanes, planes, blocks, stride, se_reduction)
            self.add_module(f"layer{index + 1}", layer)
            inplanes = planes

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, SqueezeExcitation):
                _init_squeeze_excitation(module)

    @staticmethod
    def _make_layer(
        inplanes: int, planes: int, blocks: int, stride: int, se_reduction: int | None
    ) -> nn.Sequential:
        # Same structure as torchvision.models.resnet.ResNet._make_layer for BasicBlock.
        downsample = None
        if stride != 1 or inplanes != planes:
            downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
        layers = [SEBasicBlock(inplanes, planes, stride, downsample, se_reduction)]
        layers += [SEBasicBlock(planes, planes, se_reduction=se_reduction) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (layer3, layer4) outputs: [B, 256, H/16, W/16] and [B, 512, H/32, W/32]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        layer3 = self.layer3(x)
        layer4 = self.layer4(layer3)
        return layer3, layer4


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution (no bias, BN follows), batch norm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SegmentationDecoder(nn.Module):
    """ST head: per-pixel face-part logits from layer3 and layer4.

    layer4 [B, 512, H/32] is upsampled x2 and concatenated with layer3
    [B, 256, H/16]. A conv + BN + ReLU block and an x2 upsample give H/8. Three
    (x2 upsample, conv + BN + ReLU) pairs give H/4, H/2 and H, and a 1x1 conv
    classifies each pixel. For a 224 input: 7 -> 14 (concat) -> 28 -> 56 -> 112
    -> 224. The four x2 steps after the concatenation undo exactly the x16
    reduction of layer3, so the paper's layer counts reach input resolution
    without an extra step when H and W are multiples of 32. For other sizes the
    first upsample targets layer3's size and the logits are resized
    bilinearly to the input size at the end.
    """

    def __init__(self, num_parts: int, channels: tuple[int, int, int, int]) -> None:
        super().__init__()
        layer3_channels, layer4_channels = RESNET18_STAGE_CHANNELS[2], RESNET18_STAGE_CHANNELS[3]
        self.fuse = conv_bn_relu(layer3_channels + layer4_channels, channels[0])
        self.refine = nn.ModuleList(conv_bn_relu(channels[i], channels[i + 1]) for i in range(3))
        self.classifier = nn.Conv2d(channels[3], num_parts, kernel_size=1)

    def forward(self, layer3: Tensor, layer4: Tensor, output_size: tuple[int, int]) -> Tensor:
        x = F.interpolate(layer4, size=layer3.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse(torch.cat([x, layer3], dim=1))  # [B, c0, H/16, W/16]
        x = _upsample2x(x)  # H/8
        for block in self.refine:
            x = block(_upsample2x(x))  # H/4, H/2, H
        logits = self.classifier(x)  # [B, num_parts, H, W]
        if logits.shape[-2:] != output_size:
            logits = F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)
        return logits


def _upsample2x(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class ExpressionHead(nn.Module):
    """ECT head: FC + ReLU per hidden width, then dropout and FC to the expression logits."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for out_width in hidden:
            layers += [nn.Linear(width, out_width), nn.ReLU(inplace=True)]
            width = out_width
        self.hidden = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, num_classes)
        self.feature_dim = width

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """Return (logits [B, num_classes], features [B, feature_dim]) from pooled [B, 512]."""
        features = self.hidden(pooled)
        return self.classifier(self.dropout(features)), features


class ComponentHead(nn.Module):
    """CT head: FC + ReLU, then dropout and FC to one logit per face part."""

    def __init__(self, in_features: int, hidden: int, num_parts: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_parts)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.fc2(self.dropout(F.relu(self.fc1(pooled))))


class SLFERNet(nn.Module):
    """ResNet-18 (optionally with SE) plus the ECT head and, per config, ST and CT heads.

    ``forward`` returns a dict with ``logits`` [B, num_expressions] and
    ``features`` [B, D]. In training mode it adds ``seg`` [B, num_parts, H, W]
    when the config has ST and ``ct`` [B, num_parts] when it has CT. In eval
    mode the ST and CT heads do not run. ``classify`` runs only backbone + ECT in any mode.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = ResNet18Backbone(config.se_reduction if config.se else None)
        pooled_dim = RESNET18_STAGE_CHANNELS[-1]
        self.ect_head = ExpressionHead(pooled_dim, config.ect_hidden, config.num_expressions, config.ect_dropout)
        self.st_head = SegmentationDecoder(config.num_parts, config.st_channels) if config.st else None
        self.ct_head = (
            ComponentHead(pooled_dim, config.ct_hidden, config.num_parts, config.ct_dropout) if config.ct else None
        )
        for head in (self.ect_head, self.st_head, self.ct_head):
            if head is not None:
                _init_head(head)

    @property
    def feature_dim(self) -> int:
        """Width of ``features``, the ECT activation before its last layer."""
        return self.ect_head.feature_dim

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(x.shape)}")
        layer3, layer4 = self.backbone(x)
        pooled = layer4.mean(dim=(2, 3))  # [B, 512]
        logits, features = self.ect_head(pooled)
        outputs = {"logits": logits, "features": features}
        if self.training:
            if self.st_head is not None:
                outputs["seg"] = self.st_head(layer3, layer4, output_size=tuple(x.shape[-2:]))
            if self.ct_head is not None:
                outputs["ct"] = self.ct_head(pooled)
        return outputs

    def classify(self, x: Tensor) -> dict[str, Tensor]:
        """Run backbone + ECT only, in the current train/eval mode: ``logits`` and ``features``."""
        _, layer4 = self.backbone(x)
        logits, features = self.ect_head(layer4.mean(dim=(2, 3)))
        return {"logits": logits, "features": features}


def build_model(config: ModelConfig) -> SLFERNet:
    """Build an SLFERNet with freshly initialised weights (see ``slfer.pretrained`` to load a backbone)."""
    return SLFERNet(config)


def _init_squeeze_excitation(module: SqueezeExcitation) -> None:
    nn.init.kaiming_normal_(module.fc1.weight, nonlinearity="relu")
    nn.init.zeros_(module.fc1.bias)
    # Gain 1 for the layer before the sigmoid; zero bias starts every channel weight near 0.5.
    nn.init.kaiming_normal_(module.fc2.weight, nonlinearity="linear")
    nn.init.zeros_(module.fc2.bias)


def _init_head(head: nn.Module) -> None:
    """Kaiming-initialise a head: ReLU gain for hidden layers, gain 1 for the output layer."""
    layers = [m for m in head.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for index, layer in enumerate(layers):
        is_output = index == len(layers) - 1
        nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="linear" if is_output else "relu")
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    for module in head.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
