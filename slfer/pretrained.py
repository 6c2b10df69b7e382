"""Load pretrained ResNet-18 weights into the SLFER backbone and verify that all of them loaded.

Supported sources:

- a path to ``resnet18_msceleb.pth`` (used by DAN): ``{'state_dict': ...}`` with
  plain torchvision ``resnet18`` key names, including ``fc`` [1000, 512];
- a path to ``ijba_res18_naive.pth.tar`` (used by RAN and SCN):
  ``{'state_dict': ...}`` with every key prefixed ``module.``, plus
  ``module.feature.*`` (Linear 512 -> 256) and ``module.fc.*``;
- ``"imagenet"``: torchvision's ``ResNet18_Weights.IMAGENET1K_V1``, downloaded
  into the torch hub cache (``$TORCH_HOME/hub/checkpoints``) on first use;
- ``"none"``: keep the random initialisation.

The format of a file is detected from its keys: when every key starts with
``module.`` the prefix is removed. A popular FER repository once copied
checkpoint keys under the wrong names, so nothing loaded and training went on
from random weights. This loader therefore counts the backbone tensors it
copied and raises unless every backbone parameter and BN running statistic
was loaded. ``num_batches_tracked`` is optional: old checkpoints lack it, and it
only matters for BN layers with ``momentum=None``, which this model does not
use, so a missing one stays 0 and is listed in the report. SE layers and the
heads are never in these checkpoints and keep their fresh initialisation.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import urllib.error
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import ResNet18_Weights

log = logging.getLogger(__name__)

SOURCE_IMAGENET = "imagenet"
SOURCE_NONE = "none"

# Top-level names in the supported checkpoints that are not part of the backbone.
NON_BACKBONE_PREFIXES = ("fc.", "feature.")

DATA_PARALLEL_PREFIX = "module."

WHERE_TO_GET_CHECKPOINTS = (
    "The MS-Celeb-1M ResNet-18 checkpoints have no official download URL. The FER community "
    "shares them through links in the READMEs of GitHub repositories: resnet18_msceleb.pth in "
    "DAN's (yaoing/DAN), ijba_res18_naive.pth.tar in RAN's and SCN's "
    "(kaiwang960112/Self-Cure-Network). Download one of them by hand and pass its path, or run "
    "with --backbone-weights imagenet (torchvision's ImageNet weights) or --backbone-weights "
    "none (random initialisation)."
)


class BackboneWeightsError(RuntimeError):
    """A pretrained checkpoint could not be read or did not cover the whole backbone."""


@dataclass
class LoadReport:
    """Record of the tensors that ``load_backbone_weights`` copied and skipped, for logs and config.json."""

    source: str  # as given: a path, "imagenet" or "none"
    checkpoint_format: str  # "torchvision" (plain keys), "data_parallel" (module. prefix), "imagenet", "none"
    sha256: str | None  # of the checkpoint file; None for "none"
    num_backbone_tensors: int  # parameters and BN running statistics the backbone expects
    loaded: list[str] = field(default_factory=list)  # backbone keys copied from the checkpoint
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (checkpoint key, reason)
    missing_optional: list[str] = field(default_factory=list)  # num_batches_tracked not in the file

    @property
    def num_loaded(self) -> int:
        """Number of backbone parameters and BN running statistics copied from the checkpoint."""
        return sum(1 for key in self.loaded if not key.endswith("num_batches_tracked"))

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-friendly values."""
        values = asdict(self)
        values["skipped"] = [{"key": key, "reason": reason} for key, reason in self.skipped]
        values["num_loaded"] = self.num_loaded
        return values


def load_backbone_weights(model: nn.Module, source: str | Path) -> LoadReport:
    """Copy pretrained ResNet-18 weights into ``model.backbone`` and return what was loaded.

    ``source`` is a checkpoint path, ``"imagenet"`` or ``"none"`` (see the module
    docstring). Raises ``FileNotFoundError`` for a missing file and
    ``BackboneWeightsError`` when the file cannot be read or does not provide
    every backbone parameter and BN running statistic with the right shape.
    """
    backbone: nn.Module = model.backbone
    expected = {key: value for key, value in backbone.state_dict().items() if not _is_se_key(key)}
    required = [key for key in expected if not key.endswith("num_batches_tracked")]
    source_name = str(source)

    if source_name == SOURCE_NONE:
        log.info("backbone weights: none, keeping the random initialisation")
        return LoadReport(source=source_name, checkpoint_format="none", sha256=None, num_backbone_tensors=len(required))

    if source_name == SOURCE_IMAGENET:
        state_dict, sha256 = _load_imagenet_state_dict()
        checkpoint_format = "imagenet"
    else:
        state_dict, sha256 = _read_checkpoint(Path(source))
        checkpoint_format = "torchvision"
        if state_dict and all(key.startswith(DATA_PARALLEL_PREFIX) for key in state_dict):
            state_dict = {key[len(DATA_PARALLEL_PREFIX) :]: value for key, value in state_dict.items()}
            checkpoint_format = "data_parallel"

    report = LoadReport(
        source=source_name, checkpoint_format=checkpoint_format, sha256=sha256, num_backbone_tensors=len(required)
    )
    to_load = _match_keys(state_dict, expected, report)

    missing = [key for key in required if key not in to_load]
    if missing:
        raise BackboneWeightsError(_describe_incomplete(source_name, missing, required, state_dict, report))

    backbone.load_state_dict(to_load, strict=False)
    _log_report(report)
    return report


def _match_keys(state_dict: dict[str, Tensor], expected: dict[str, Tensor], report: LoadReport) -> dict[str, Tensor]:
    """Select the checkpoint tensors that fit the backbone; record the rest in ``report.skipped``."""
    to_load: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(NON_BACKBONE_PREFIXES):
            report.skipped.append((key, "not a backbone key"))
        elif key not in expected:
            report.skipped.append((key, "no backbone tensor of this name"))
        elif not isinstance(value, Tensor):
            report.skipped.append((key, f"not a tensor ({type(value).__name__})"))
        elif value.shape != expected[key].shape:
            report.skipped.append(
                (key, f"shape mismatch: checkpoint {tuple(value.shape)}, backbone {tuple(expected[key].shape)}")
            )
        else:
            to_load[key] = value
            report.loaded.append(key)
    report.missing_optional = [
        key for key in expected if key.endswith("num_batches_tracked") and key not in to_load
    ]
    return to_load


def _read_checkpoint(path: Path) -> tuple[dict[str, Tensor], str]:
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint {path} not found. {WHERE_TO_GET_CHECKPOINTS}")
    # NOTE: the real MS-Celeb-1M files were not available when this was written. If one of
    # them pickles objects other than tensors and plain containers, weights_only=True rejects it.
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise BackboneWeightsError(
            f"could not read backbone checkpoint {path} with torch.load(weights_only=True): {error}. "
            "Check that the download is complete; a checkpoint that stores Python objects other than "
            "tensors must be re-saved as {'state_dict': model.state_dict()}."
        ) from error

    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        state_dict = checkpoint["state_dict"]
    elif isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, Tensor) for v in checkpoint.values()):
        # A bare state dict, as torch.save(model.state_dict()) writes it.
        state_dict = checkpoint
    else:
        found = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise BackboneWeightsError(
            f"backbone checkpoint {path} contains neither {{'state_dict': ...}} nor a bare state dict; found {found}"
        )
    return state_dict, _sha256(path)


def _load_imagenet_state_dict() -> tuple[dict[str, Tensor], str]:
    weights = ResNet18_Weights.IMAGENET1K_V1
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    # NOTE: the tests have no network, so the download itself is never exercised. They
    # cover reading the cached file and the error for a failed download.
    try:
        state_dict = weights.get_state_dict(progress=False, check_hash=True, map_location="cpu", weights_only=True)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        raise BackboneWeightsError(
            f"could not load torchvision's ImageNet ResNet-18 weights from {weights.url} into "
            f"{cache_dir}: {error}. On a machine without internet access, download that file "
            f"elsewhere and copy it into {cache_dir} (the TORCH_HOME environment variable moves "
            "this folder), or use --backbone-weights none or an MS-Celeb-1M checkpoint path."
        ) from error
    return state_dict, _sha256(cache_dir / Path(weights.url).name)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_se_key(key: str) -> bool:
    return ".se." in f".{key}"


def _describe_incomplete(
    source: str, missing: list[str], required: list[str], state_dict: dict[str, Tensor], report: LoadReport
) -> str:
    lines = [
        f"backbone checkpoint {source} provides {len(required) - len(missing)} of the {len(required)} "
        f"backbone tensors, so training would start from a partly random backbone.",
        f"missing (first 5 of {len(missing)}): {missing[:5]}",
        f"checkpoint keys (first 5 of {len(state_dict)}): {list(state_dict)[:5]}",
        "expected torchvision resnet18 names such as 'conv1.weight' and 'layer1.0.bn1.running_mean', "
        "optionally all prefixed 'module.'.",
    ]
    mismatched = [(key, reason) for key, reason in report.skipped if reason.startswith("shape mismatch")]
    if mismatched:
        lines.append(f"shape mismatches (first 5 of {len(mismatched)}): {mismatched[:5]}")
    return "\n".join(lines)


def _log_report(report: LoadReport) -> None:
    log.info(
        "backbone weights from %s (%s format): loaded %d of %d backbone tensors, skipped %d checkpoint keys",
        report.source,
        report.checkpoint_format,
        report.num_loaded,
        report.num_backbone_tensors,
        len(report.skipped),
    )
    for key, reason in report.skipped:
        log.info("skipped checkpoint key %s: %s", key, reason)
    if report.missing_optional:
        log.info(
            "%d BN num_batches_tracked counters not in the checkpoint; they stay 0 (unused with BN momentum set)",
            len(report.missing_optional),
        )
