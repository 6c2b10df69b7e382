"""Test-set evaluation: predictions, accuracy metrics, feature export, and re-evaluation of a saved model.

``metrics.json`` reports the accuracy of the model it is given (the final epoch of a
run), never a best epoch chosen on the test set.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from slfer import __version__
from slfer.atomic import save_npz, write_json, write_text
from slfer.data import BatchLoader, SplitTensors, centre_crop_plan, load_split_tensors

log = logging.getLogger(__name__)

MODEL_FORMAT = "slfer-model"
MODEL_FORMAT_VERSION = 1


@dataclass
class Predictions:
    """Model outputs over one split, in the split's order."""

    names: list[str]
    labels: np.ndarray  # int64 [N]
    probabilities: np.ndarray  # float32 [N, K]
    features: np.ndarray  # float32 [N, D], the expression head's penultimate features

    @property
    def predictions(self) -> np.ndarray:
        """Predicted class ids, int64 [N]."""
        return self.probabilities.argmax(axis=1).astype(np.int64)


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    split: SplitTensors,
    crop_size: int,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = True,
) -> Predictions:
    """Run ``model`` in eval mode on the centre crops of every image of ``split``."""
    was_training = model.training
    model.eval()
    loader = BatchLoader(split, device, crop_size, with_masks=False, with_topn=False, channels_last=channels_last)
    probabilities, features = [], []
    order = torch.arange(len(split))
    with tqdm(total=len(split), desc="evaluate", unit="img", disable=not progress, leave=False) as bar:
        for indices in order.split(batch_size):
            batch = loader.load(indices, centre_crop_plan(indices.shape[0], split.image_size, crop_size))
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                outputs = model(batch.images)
            probabilities.append(torch.softmax(outputs["logits"].float(), dim=1).cpu())
            features.append(outputs["features"].float().cpu())
            bar.update(indices.shape[0])
    model.train(was_training)
    return Predictions(
        names=list(split.names),
        labels=split.labels.numpy().astype(np.int64),
        probabilities=torch.cat(probabilities).numpy().astype(np.float32),
        features=torch.cat(features).numpy().astype(np.float32),
    )


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, class_names: list[str]) -> dict:
    """Compute accuracy, mean class accuracy, per-class accuracy and the confusion matrix.

    Rows of the confusion matrix are true classes and columns predicted classes. A class
    absent from ``labels`` has per-class accuracy ``None`` and is left out of the mean.
    """
    num_classes = len(class_names)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    support = confusion.sum(axis=1)
    per_class = {}
    for class_id, name in enumerate(class_names):
        per_class[name] = None if support[class_id] == 0 else float(confusion[class_id, class_id] / support[class_id])
    present = [value for value in per_class.values() if value is not None]
    return {
        "accuracy": float(np.trace(confusion) / max(int(confusion.sum()), 1)),
        "mean_class_accuracy": float(np.mean(present)) if present else None,
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
        "class_names": list(class_names),
        "num_test_images": int(labels.shape[0]),
    }


def write_predictions_csv(path: Path, result: Predictions, class_names: list[str]) -> None:
    """Write one row per image: name, label, prediction and the probability of each class."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["name", "label", "prediction", *(f"prob_{name}" for name in class_names)])
    for name, label, prediction, row in zip(result.names, result.labels, result.predictions, result.probabilities):
        writer.writerow([name, int(label), int(prediction), *(f"{value:.6f}" for value in row)])
    write_text(path, buffer.getvalue())


def write_features(path: Path, result: Predictions) -> None:
    """Write features [N, D], labels, predictions and names to an ``.npz`` file for t-SNE."""
    save_npz(
        path,
        features=result.features,
        labels=result.labels,
        predictions=result.predictions,
        names=np.asarray(result.names, dtype=np.str_),
    )


def load_model_file(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Load a ``model.pt`` written by ``slfer train`` and return the eval-mode model and its record."""
    from slfer.model import ModelConfig, build_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found; pass the model.pt of a finished run")
    record = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(record, dict) or record.get("format") != MODEL_FORMAT:
        raise ValueError(
            f"{path} is not a slfer model file (format {record.get('format') if isinstance(record, dict) else None!r}, "
            f"expected {MODEL_FORMAT!r}); pass RUN_DIR/model.pt, not checkpoint.pt or backbone weights"
        )
    if record.get("format_version") != MODEL_FORMAT_VERSION:
        raise ValueError(
            f"{path} has model format version {record.get('format_version')}; this slfer reads version "
            f"{MODEL_FORMAT_VERSION}"
        )
    model = build_model(ModelConfig.from_dict(record["model_config"]))
    model.load_state_dict(record["state_dict"], strict=True)
    model.to(device).eval()
    return model, record


def write_evaluation(
    out_dir: Path, result: Predictions, class_names: list[str], extra: dict | None = None
) -> dict:
    """Write predictions.csv, features.npz and, last, metrics.json to ``out_dir``; return the metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = classification_metrics(result.labels, result.predictions, class_names)
    metrics.update(extra or {})
    write_predictions_csv(out_dir / "predictions.csv", result, class_names)
    write_features(out_dir / "features.npz", result)
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def evaluate_model_file(
    model_path: str | Path,
    cache_path: str | Path,
    out_dir: str | Path,
    split: str = "test",
    device: torch.device | None = None,
    batch_size: int | None = None,
) -> dict:
    """Evaluate a saved model on ``split`` of any image cache and write its outputs to ``out_dir``.

    The cache needs no mask archive. Raises ``ValueError`` when the cache's expression
    classes or image size differ from those the model was trained with.
    """
    device = device or torch.device("cpu")
    model, record = load_model_file(model_path, device)
    data = load_split_tensors(cache_path, None, split, pin_memory=device.type == "cuda")

    class_names = list(record["class_names"])
    if list(data.expressions) != class_names:
        raise ValueError(
            f"image cache {cache_path} has expression classes {list(data.expressions)}, but model "
            f"{model_path} was trained on {class_names}; rebuild the cache with the same class names and order"
        )
    if data.image_size != record["image_size"]:
        raise ValueError(
            f"image cache {cache_path} stores {data.image_size} px images, but model {model_path} was "
            f"trained on {record['image_size']} px images cropped to {record['crop_size']} px; rebuild the "
            f"cache with --size {record['image_size']} so faces appear at the trained scale"
        )

    autocast_dtype = None
    if device.type == "cuda" and record.get("autocast_dtype") in ("bfloat16", "float16"):
        # NOTE: CUDA autocast during evaluation is unexercised by the CPU test suite.
        autocast_dtype = getattr(torch, record["autocast_dtype"])
    log.info("evaluating %s on split %r of %s (%d images)", model_path, split, cache_path, len(data))
    result = predict(
        model,
        data,
        crop_size=record["crop_size"],
        batch_size=batch_size or record.get("batch_size", 16),
        device=device,
        autocast_dtype=autocast_dtype,
    )
    extra = {
        "dataset": data.dataset,
        "split": split,
        "model": str(model_path),
        "variant": record.get("variant"),
        "seed": record.get("seed"),
        "package_version": __version__,
    }
    metrics = write_evaluation(Path(out_dir), result, class_names, extra)
    log.info(
        "accuracy %.4f, mean class accuracy %s on %d images",
        metrics["accuracy"],
        metrics["mean_class_accuracy"],
        metrics["num_test_images"],
    )
    return metrics
