"""The model variants of the SLFER paper's ablation (its Table 1), by name.

- ``baseline``: ResNet-18 + ECT head.
- ``ct``: adds the component classification head.
- ``st``: adds the segmentation head.
- ``ct_st``: both auxiliary heads.
- ``proposed``: both auxiliary heads and SE in every residual block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slfer.model import ModelConfig


@dataclass(frozen=True)
class Variant:
    """Switches for the optional parts of one variant."""

    se: bool
    st: bool
    ct: bool


VARIANTS: dict[str, Variant] = {
    "baseline": Variant(se=False, st=False, ct=False),
    "ct": Variant(se=False, st=False, ct=True),
    "st": Variant(se=False, st=True, ct=False),
    "ct_st": Variant(se=False, st=True, ct=True),
    "proposed": Variant(se=True, st=True, ct=True),
}


def get_variant(name: str) -> Variant:
    """Return the variant called ``name``; raise ``ValueError`` listing the known names otherwise."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}") from None


def model_config_for(name: str, **overrides: Any) -> ModelConfig:
    """Build the ModelConfig of variant ``name``, with width overrides such as ``ct_hidden=128``.

    Overriding ``se``, ``st`` or ``ct`` raises ``ValueError``, because the
    variant name alone must determine the heads of a run.
    """
    variant = get_variant(name)
    fixed = sorted({"se", "st", "ct"} & set(overrides))
    if fixed:
        raise ValueError(f"{fixed} are set by the variant {name!r} and cannot be overridden")
    return ModelConfig(se=variant.se, st=variant.st, ct=variant.ct, **overrides)
