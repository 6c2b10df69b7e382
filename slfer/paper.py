"""Numbers reported in the SLFER paper, kept beside the measured ones in every table.

Source: "SLFER: Semantic Learning for Facial Expression Recognition", Tables 1-3
and Figure 3. All values are test accuracy in percent: RAF-DB basic test split,
and SFEW 2.0 Val split (SFEW test labels were never released).

NOTE: ``SLFER_CITATION`` gives the title only, because the authors and venue were
not checked against the publication; complete it from the paper itself.
"""

from __future__ import annotations

from dataclasses import dataclass

SLFER_CITATION = "SLFER: Semantic Learning for Facial Expression Recognition"

# Dataset keys used by the paper's tables. A configured dataset names one of
# these in its ``paper`` key to have the paper's numbers shown beside its own.
PAPER_DATASETS: tuple[str, ...] = ("rafdb", "sfew")

# Table 1: ablation of the auxiliary tasks. Keys are the variant names of
# slfer.variants (CT = component task, ST = segmentation task, Proposed adds SE).
TABLE1: dict[str, dict[str, float]] = {
    "baseline": {"rafdb": 86.93, "sfew": 52.98},
    "ct": {"rafdb": 87.77, "sfew": 55.73},
    "st": {"rafdb": 87.87, "sfew": 54.35},
    "ct_st": {"rafdb": 88.01, "sfew": 59.63},
    "proposed": {"rafdb": 88.33, "sfew": 59.86},
}

# Row labels the paper uses for the variants.
VARIANT_TITLES: dict[str, str] = {
    "baseline": "Baseline",
    "ct": "CT",
    "st": "ST",
    "ct_st": "CT+ST",
    "proposed": "Proposed (CT+ST+SE)",
}

# Table 3: Proposed with one loss weight varied and the other fixed at 0.5.
# Keys are the varied weight's value.
TABLE3_LAMBDA1: dict[float, dict[str, float]] = {
    0.0: {"rafdb": 87.54, "sfew": 57.56},
    0.001: {"rafdb": 87.90, "sfew": 57.79},
    0.1: {"rafdb": 88.07, "sfew": 58.52},
    0.5: {"rafdb": 88.33, "sfew": 59.86},
    1.0: {"rafdb": 88.13, "sfew": 57.79},
}
TABLE3_LAMBDA2: dict[float, dict[str, float]] = {
    0.0: {"rafdb": 87.74, "sfew": 55.96},
    0.001: {"rafdb": 87.84, "sfew": 56.42},
    0.1: {"rafdb": 87.77, "sfew": 57.79},
    0.5: {"rafdb": 88.33, "sfew": 59.86},
    1.0: {"rafdb": 87.64, "sfew": 56.19},
}

# Figure 3 plots accuracy against n, the number of dominant components marked
# positive in the component task. The paper states only that n = 4 is best and
# prints no values, so the figure's table carries no paper numbers.
FIGURE3_BEST_N = 4


@dataclass(frozen=True)
class PublishedMethod:
    """One comparison row of Table 2, as the SLFER paper reports it."""

    name: str
    citation: str
    # Accuracy in percent per dataset key; None where the paper prints "-".
    accuracy: dict[str, float | None]


# Table 2: published methods, with the figures the SLFER paper quotes for them.
TABLE2_PUBLISHED: tuple[PublishedMethod, ...] = (
    PublishedMethod(
        "DLP-CNN",
        "Li, Deng, Du. Reliable Crowdsourcing and Deep Locality-Preserving Learning "
        "for Expression Recognition in the Wild. CVPR 2017",
        {"rafdb": 84.13, "sfew": 51.05},
    ),
    PublishedMethod(
        "IPA2LT",
        "Zeng, Shan, Chen. Facial Expression Recognition with Inconsistently "
        "Annotated Datasets. ECCV 2018",
        {"rafdb": 86.77, "sfew": 58.29},
    ),
    PublishedMethod(
        "RAN",
        "Wang, Peng, Yang, Meng, Qiao. Region Attention Networks for Pose and "
        "Occlusion Robust Facial Expression Recognition. IEEE TIP 2020",
        {"rafdb": 86.90, "sfew": 56.40},
    ),
    PublishedMethod(
        "SCN",
        "Wang, Peng, Yang, Meng, Qiao. Suppressing Uncertainties for Large-Scale "
        "Facial Expression Recognition. CVPR 2020",
        {"rafdb": 87.03, "sfew": None},
    ),
    PublishedMethod(
        "DDL",
        "Ruan, Yan, Chen, Xue, Wang. Deep Disturbance-Disentangled Learning for "
        "Facial Expression Recognition. ACM Multimedia 2020",
        {"rafdb": 87.71, "sfew": 59.86},
    ),
    # NOTE: D3Net's reference was not checked against the publication; take it
    # from the SLFER paper's bibliography.
    PublishedMethod(
        "D3Net",
        "D3Net, as cited in the SLFER paper's Table 2",
        {"rafdb": 88.79, "sfew": 62.16},
    ),
    PublishedMethod(
        "FDRL",
        "Ruan, Yan, Lai, Chai, Shen, Wang. Feature Decomposition and Reconstruction "
        "Learning for Effective Facial Expression Recognition. CVPR 2021",
        {"rafdb": 89.47, "sfew": 62.16},
    ),
    PublishedMethod(
        "TransFER",
        "Xue, Wang, Guo. TransFER: Learning Relation-aware Facial Expression "
        "Representations with Transformers. ICCV 2021",
        {"rafdb": 90.91, "sfew": None},
    ),
)

# Rows of Table 2 that this project measures itself.
TABLE2_MEASURED: tuple[str, ...] = ("baseline", "proposed")


def paper_accuracy(table: str, row: str | float, dataset: str | None) -> float | None:
    """Return the paper's accuracy (%) for one cell, or None when it prints none.

    ``table`` is one of "table1", "table2", "table3a" (lambda1 varied),
    "table3b" (lambda2 varied) or "figure3"; ``row`` is a variant name for
    tables 1 and 2 and the varied value for table 3. ``dataset`` is a key of
    ``PAPER_DATASETS`` or None for a dataset the paper does not report.
    """
    if dataset is None:
        return None
    if dataset not in PAPER_DATASETS:
        raise ValueError(f"unknown paper dataset {dataset!r}; expected one of {PAPER_DATASETS}")
    if table in ("table1", "table2"):
        return TABLE1.get(str(row), {}).get(dataset)
    if table in ("table3a", "table3b"):
        values = TABLE3_LAMBDA1 if table == "table3a" else TABLE3_LAMBDA2
        return values.get(float(row), {}).get(dataset)
    if table == "figure3":
        return None
    raise ValueError(f"unknown table {table!r}; expected table1, table2, table3a, table3b or figure3")
