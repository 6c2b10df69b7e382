"""Tests of the SLFER loss and the torch top-n component labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slfer.losses import crop_top_n_labels, slfer_loss

# Fixed tensors for the hand computation: 2 images, 3 expressions, 2 parts, 1x2 pixels.
LOGITS = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
LABELS = torch.tensor([0, 2])
SEG = torch.tensor(
    [
        [[[2.0, 0.0]], [[0.0, 1.0]]],  # image 0: part 0 logits, part 1 logits for pixels (0,0), (0,1)
        [[[0.0, 0.0]], [[3.0, -1.0]]],
    ]
)  # [B=2, P=2, H=1, W=2]
SEG_TARGET = torch.tensor([[[0, 1]], [[1, 0]]])  # [B, H, W]
CT = torch.tensor([[0.0, 2.0], [-1.0, 1.0]])  # [B, P]
CT_TARGET = torch.tensor([[1.0, 0.0], [1.0, 1.0]])


def cross_entropy(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


def binary_cross_entropy_with_logits(logit: float, target: float) -> float:
    probability = 1.0 / (1.0 + math.exp(-logit))
    return -(target * math.log(probability) + (1.0 - target) * math.log(1.0 - probability))


def hand_terms() -> tuple[float, float, float]:
    ect = (cross_entropy([1.0, 0.0, -1.0], 0) + cross_entropy([0.5, 0.5, 2.0], 2)) / 2
    st = (
        cross_entropy([2.0, 0.0], 0)  # image 0, pixel (0,0), target 0
        + cross_entropy([0.0, 1.0], 1)  # image 0, pixel (0,1), target 1
        + cross_entropy([0.0, 3.0], 1)  # image 1, pixel (0,0), target 1
        + cross_entropy([0.0, -1.0], 0)  # image 1, pixel (0,1), target 0
    ) / 4
    ct = (
        binary_cross_entropy_with_logits(0.0, 1.0)
        + binary_cross_entropy_with_logits(2.0, 0.0)
        + binary_cross_entropy_with_logits(-1.0, 1.0)
        + binary_cross_entropy_with_logits(1.0, 1.0)
    ) / 4
    return ect, st, ct


def test_loss_matches_hand_computation():
    ect, st, ct = hand_terms()
    outputs = {"logits": LOGITS, "seg": SEG, "ct": CT}

    total, terms = slfer_loss(outputs, LABELS, SEG_TARGET, CT_TARGET, lambda1=0.5, lambda2=0.25)

    assert terms["ect"].item() == pytest.approx(ect, rel=1e-6)
    assert terms["st"].item() == pytest.approx(st, rel=1e-6)
    assert terms["ct"].item() == pytest.approx(ct, rel=1e-6)
    assert total.item() == pytest.approx(ect + 0.5 * st + 0.25 * ct, rel=1e-6)


def test_absent_heads_give_none_terms():
    ect, _, _ = hand_terms()

    total, terms = slfer_loss({"logits": LOGITS}, LABELS, SEG_TARGET, CT_TARGET, lambda1=0.5, lambda2=0.5)

    assert terms["st"] is None
    assert terms["ct"] is None
    assert total.item() == pytest.approx(ect, rel=1e-6)


def test_only_ct_head_present():
    ect, _, ct = hand_terms()

    total, terms = slfer_loss({"logits": LOGITS, "ct": CT}, LABELS, None, CT_TARGET, lambda1=0.5, lambda2=0.5)

    assert terms["st"] is None
    assert total.item() == pytest.approx(ect + 0.5 * ct, rel=1e-6)


def test_zero_lambda_keeps_term_reported():
    ect, st, _ = hand_terms()

    total, terms = slfer_loss({"logits": LOGITS, "seg": SEG}, LABELS, SEG_TARGET, None, lambda1=0.0, lambda2=0.5)

    assert terms["st"].item() == pytest.approx(st, rel=1e-6)
    assert total.item() == pytest.approx(ect, rel=1e-6)


def test_terms_are_detached():
    logits = LOGITS.clone().requires_grad_(True)

    total, terms = slfer_loss({"logits": logits}, LABELS, None, None, 0.5, 0.5)

    assert total.requires_grad
    assert not terms["ect"].requires_grad


def test_missing_seg_target_raises():
    with pytest.raises(ValueError, match="seg_target is None"):
        slfer_loss({"logits": LOGITS, "seg": SEG}, LABELS, None, None, 0.5, 0.5)


def test_missing_ct_target_raises():
    with pytest.raises(ValueError, match="ct_target is None"):
        slfer_loss({"logits": LOGITS, "ct": CT}, LABELS, None, None, 0.5, 0.5)


def test_seg_target_shape_mismatch_raises():
    with pytest.raises(ValueError, match="seg_target has shape"):
        slfer_loss({"logits": LOGITS, "seg": SEG}, LABELS, SEG_TARGET[:, :, :1], None, 0.5, 0.5)


def test_ct_target_shape_mismatch_raises():
    with pytest.raises(ValueError, match="ct_target has shape"):
        slfer_loss({"logits": LOGITS, "ct": CT}, LABELS, None, CT_TARGET[:, :1], 0.5, 0.5)


def reference_top_n(counts: np.ndarray, n: int) -> np.ndarray:
    """The top-n rule written as plainly as possible: sort by (-count, class id)."""
    labels = np.zeros(counts.shape, dtype=np.uint8)
    for row, row_counts in enumerate(counts):
        order = sorted(range(len(row_counts)), key=lambda c: (-row_counts[c], c))
        for class_id in order[:n]:
            if row_counts[class_id] > 0:
                labels[row, class_id] = 1
    return labels


def masks_from_counts(counts: list[list[int]], width: int) -> torch.Tensor:
    """Build [B, 1, width] masks whose class pixel counts equal ``counts`` (each row sums to width)."""
    rows = []
    for row_counts in counts:
        assert sum(row_counts) == width
        rows.append([c for c, count in enumerate(row_counts) for _ in range(count)])
    return torch.tensor(rows).reshape(len(counts), 1, width)


def counts_of(masks: torch.Tensor, num_classes: int = 8) -> np.ndarray:
    flat = masks.reshape(masks.shape[0], -1).numpy()
    return np.stack([np.bincount(row, minlength=num_classes) for row in flat])


# Each row sums to 12 pixels.
EDGE_CASE_COUNTS = [
    [3, 3, 3, 3, 0, 0, 0, 0],  # four-way tie at the cut for n < 4
    [0, 2, 2, 2, 2, 2, 2, 0],  # six tied classes, class 0 absent
    [12, 0, 0, 0, 0, 0, 0, 0],  # one class: n > present classes
    [1, 1, 1, 1, 1, 1, 1, 5],  # largest class last
    [0, 0, 0, 0, 6, 0, 6, 0],  # two present classes tied
]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 7, 8, 10])
def test_top_n_edge_cases_match_reference(n):
    masks = masks_from_counts(EDGE_CASE_COUNTS, width=12)

    labels = crop_top_n_labels(masks, n)

    assert labels.dtype == torch.float32
    np.testing.assert_array_equal(labels.numpy(), reference_top_n(counts_of(masks), n))


def test_top_n_ties_go_to_lower_class_id():
    masks = masks_from_counts([[3, 3, 3, 3, 0, 0, 0, 0]], width=12)

    labels = crop_top_n_labels(masks, 2)

    assert labels.tolist() == [[1, 1, 0, 0, 0, 0, 0, 0]]


def test_top_n_never_marks_absent_class():
    masks = masks_from_counts([[12, 0, 0, 0, 0, 0, 0, 0]], width=12)

    labels = crop_top_n_labels(masks, 4)

    assert labels.tolist() == [[1, 0, 0, 0, 0, 0, 0, 0]]


def test_top_n_random_masks_match_reference():
    generator = torch.Generator().manual_seed(0)
    # Few classes per image and small crops make ties and absent classes common.
    masks = torch.randint(0, 5, (64, 4, 4), generator=generator) + torch.randint(0, 4, (64, 1, 1), generator=generator)

    for n in range(1, 9):
        labels = crop_top_n_labels(masks, n)
        np.testing.assert_array_equal(labels.numpy(), reference_top_n(counts_of(masks), n), err_msg=f"n={n}")


def test_top_n_matches_parsing_archive():
    from parsing.archive import top_n_labels

    generator = torch.Generator().manual_seed(1)
    random_masks = torch.randint(0, 5, (64, 4, 4), generator=generator)
    random_masks += torch.randint(0, 4, (64, 1, 1), generator=generator)
    edge_case_masks = masks_from_counts(EDGE_CASE_COUNTS, width=12)

    for masks in (random_masks, edge_case_masks):
        counts = counts_of(masks).astype(np.int32)
        for n in range(0, 11):
            expected = top_n_labels(counts, n)
            np.testing.assert_array_equal(crop_top_n_labels(masks, n).numpy(), expected, err_msg=f"n={n}")


def test_top_n_accepts_uint8_masks():
    masks = masks_from_counts(EDGE_CASE_COUNTS, width=12)

    labels = crop_top_n_labels(masks.to(torch.uint8), 4)

    np.testing.assert_array_equal(labels.numpy(), reference_top_n(counts_of(masks), 4))


def test_top_n_rejects_out_of_range_class():
    masks = torch.full((1, 2, 2), 8)

    with pytest.raises(ValueError, match=r"values must be in \[0, 8\)"):
        crop_top_n_labels(masks, 4)


def test_top_n_rejects_negative_n():
    with pytest.raises(ValueError, match="non-negative integer, got -1"):
        crop_top_n_labels(torch.zeros(1, 2, 2, dtype=torch.long), -1)


def test_top_n_rejects_float_masks():
    with pytest.raises(ValueError, match="integer class ids"):
        crop_top_n_labels(torch.zeros(1, 2, 2), 4)
