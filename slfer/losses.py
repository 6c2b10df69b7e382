"""The SLFER training loss and the top-n component labels computed from mask crops.

L = CE(ECT logits, expression) + lambda1 * CE(ST logits, 8-class mask; mean over
pixels) + lambda2 * BCEWithLogits(CT logits, top-n multi-hot labels; mean over
images and classes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from parsing.labels import FACE_PARTS_8


def slfer_loss(
    outputs: dict[str, Tensor],
    labels: Tensor,
    seg_target: Tensor | None,
    ct_target: Tensor | None,
    lambda1: float,
    lambda2: float,
) -> tuple[Tensor, dict[str, Tensor | None]]:
    """Compute the weighted multi-task loss from ``SLFERNet`` outputs.

    Args:
        outputs: the model's dict; ``logits`` [B, K] is required, ``seg``
            [B, P, H, W] and ``ct`` [B, P] are used when present.
        labels: expression ids, long [B].
        seg_target: coarse part ids per pixel, long [B, H, W]; required when
            ``outputs`` has ``seg``, ignored otherwise.
        ct_target: multi-hot top-n labels, [B, P] (any dtype, cast to float);
            required when ``outputs`` has ``ct``, ignored otherwise.
        lambda1, lambda2: weights of the ST and CT terms.

    Returns:
        (total, terms): ``total`` is the scalar to backpropagate. ``terms`` maps
        "ect", "st" and "ct" to the unweighted, detached term, or to None for a
        head that produced no output (absent from the variant, or eval mode).
    """
    total = F.cross_entropy(outputs["logits"], labels)
    terms: dict[str, Tensor | None] = {"ect": total.detach(), "st": None, "ct": None}

    if "seg" in outputs:
        seg = outputs["seg"]
        if seg_target is None:
            raise ValueError("the model produced ST logits ('seg') but seg_target is None")
        if seg_target.shape != (seg.shape[0], *seg.shape[2:]):
            raise ValueError(
                f"seg_target has shape {tuple(seg_target.shape)}, expected {(seg.shape[0], *seg.shape[2:])} "
                "to match the ST logits [B, P, H, W]"
            )
        # Mean over every pixel of every image in the batch.
        st_term = F.cross_entropy(seg, seg_target.long())
        total = total + lambda1 * st_term
        terms["st"] = st_term.detach()

    if "ct" in outputs:
        ct = outputs["ct"]
        if ct_target is None:
            raise ValueError("the model produced CT logits ('ct') but ct_target is None")
        if ct_target.shape != ct.shape:
            raise ValueError(f"ct_target has shape {tuple(ct_target.shape)}, expected {tuple(ct.shape)}")
        # Mean over images and classes. Autocast runs this loss in float32.
        ct_term = F.binary_cross_entropy_with_logits(ct, ct_target.to(ct.dtype))
        total = total + lambda2 * ct_term
        terms["ct"] = ct_term.detach()

    return total, terms


def crop_top_n_labels(masks8: Tensor, n: int, num_classes: int = len(FACE_PARTS_8)) -> Tensor:
    """Mark the ``n`` coarse parts that cover the most pixels of each mask.

    Same rule as ``parsing.archive.top_n_labels``: order classes by pixel count
    descending, ties broken by the lower class id, mark the first ``n``, then
    unmark classes with a count of 0. Used when the labels come from the crop
    fed to the network rather than from the whole mask.

    Args:
        masks8: class ids, integer [B, h, w] with values in [0, num_classes).
        n: number of parts to mark; 0 marks none, and values above
            ``num_classes`` mark every present class.

    Returns:
        float32 [B, num_classes] of 0/1 on the device of ``masks8``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if masks8.ndim != 3:
        raise ValueError(f"masks8 must have shape [B, h, w], got {tuple(masks8.shape)}")
    if masks8.dtype.is_floating_point or masks8.dtype == torch.bool:
        raise ValueError(f"masks8 must hold integer class ids, got dtype {masks8.dtype}")
    flat = masks8.reshape(masks8.shape[0], -1).long()  # [B, h*w]
    if flat.numel() and (flat.min() < 0 or flat.max() >= num_classes):
        raise ValueError(
            f"masks8 values must be in [0, {num_classes}), got min {int(flat.min())} max {int(flat.max())}"
        )

    counts = torch.zeros(flat.shape[0], num_classes, dtype=torch.long, device=flat.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat))  # [B, C] pixel counts
    # A stable descending sort keeps equal counts in class-id order, so ties go to the lower id.
    order = torch.sort(counts, dim=1, descending=True, stable=True).indices
    top = order[:, : min(n, num_classes)]
    labels = torch.zeros(counts.shape, dtype=torch.float32, device=flat.device)
    labels.scatter_(1, top, 1.0)
    return labels * (counts > 0)
