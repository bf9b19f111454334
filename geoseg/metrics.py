"""Segmentation metrics from a confusion matrix: pure numpy."""

from __future__ import annotations

import numpy as np

IGNORE = 255


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``cm[t, p]``: pixels of true class t predicted as p; pixels where either is nodata are left out."""
    keep = (truth != IGNORE) & (pred != IGNORE) & (truth < n_classes) & (pred < n_classes)
    idx = truth[keep].astype(np.int64) * n_classes + pred[keep].astype(np.int64)
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """IoU per class; NaN for classes absent from both truth and prediction."""
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / denom, np.nan)


def summarize(cm: np.ndarray, names: list[str]) -> dict:
    iou = iou_per_class(cm)
    total = cm.sum()
    return {
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
        "overall_accuracy": float(np.trace(cm) / total) if total else 0.0,
        "iou": {name: (None if np.isnan(v) else round(float(v), 4)) for name, v in zip(names, iou, strict=True)},
        "confusion_matrix": cm.tolist(),
        "pixels": int(total),
    }
