"""A site's local evaluation report: metrics JSON, per-class table, confusion matrix, ROC curves, Grad-CAM gallery.

Everything here stays on the site's machine. The coordinator's equivalent is built from the
aggregate metrics the sites send (confusion counts and per-class AUCs), never from images.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime, timezone
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from sklearn.metrics import auc as trapezoid_area  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from shared.calibration import calibration_bins  # noqa: E402
from shared.data.cache import CachedImages  # noqa: E402
from shared.durable_files import write_json_atomically  # noqa: E402
from shared.ensemble import Ensemble, normalise_pixels  # noqa: E402
from shared.errors import DataError  # noqa: E402
from shared.explain.gradcam import overlay_heatmap  # noqa: E402
from shared.isic_metrics import isic_scores  # noqa: E402
from shared.metrics import classification_metrics  # noqa: E402
from shared.report_files import plot_confusion_matrix, write_table  # noqa: E402
from shared.site_names import safe_site_name  # noqa: E402

REPORT_DIR_NODE_KEY = "report-dir"
DEFAULT_REPORT_ROOT = Path.home() / ".local" / "share" / "skin-fl" / "reports"
TABLE_COLUMNS = ("support", "sensitivity", "specificity", "ppv", "npv", "f1", "auc", "auc_sens_80", "ap")
REPORT_FILES = ("metrics.json", "per_class.csv", "per_class.txt", "confusion_matrix.png", "roc_curves.png", "gallery.html")


def predict_images(ensemble: Ensemble, images: CachedImages, batch_size: int = 64) -> np.ndarray:
    """Mean class probabilities [N, K] of the ensemble on cached images, in order."""
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = np.asarray(images.images[start : start + batch_size])
        chunks.append(ensemble.predict(normalise_pixels(pixels, ensemble.saved.mean, ensemble.saved.std), batch_size))
    return np.concatenate(chunks) if chunks else np.zeros((0, len(ensemble.classes)), dtype=np.float32)


def per_class_rows(metrics: dict, isic: dict) -> dict[str, dict]:
    """One row per class: support, ISIC per-category metrics, F1 and AUC."""
    rows = {}
    for name, isic_row in isic["per_category"].items():
        rows[name] = {
            "support": metrics["per_class"][name]["support"],
            "sensitivity": isic_row["sensitivity"],
            "specificity": isic_row["specificity"],
            "ppv": isic_row["ppv"],
            "npv": isic_row["npv"],
            "f1": metrics["per_class"][name]["f1"],
            "auc": isic_row["auc"],
            "auc_sens_80": isic_row["auc_sens_80"],
            "ap": isic_row["ap"],
        }
    return rows


def plot_roc_curves(labels: np.ndarray, probabilities: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    """One-vs-rest ROC curve per class that has positive and negative images, AUC in the legend."""
    figure, axis = plt.subplots(figsize=(6, 5.5))
    for index, name in enumerate(classes):
        is_class = labels == index
        if 0 < is_class.sum() < labels.size:
            false_positive_rate, true_positive_rate, _ = roc_curve(is_class, probabilities[:, index])
            area = float(trapezoid_area(false_positive_rate, true_positive_rate))
            axis.plot(false_positive_rate, true_positive_rate, label=f"{name} (AUC {area:.3f}, n={int(is_class.sum())})")
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    axis.axhline(0.8, color="grey", linestyle=":", linewidth=0.8)
    axis.set(xlabel="false-positive rate (1 - specificity)", ylabel="true-positive rate (sensitivity)", title=title,
             xlim=(0, 1), ylim=(0, 1.01))
    axis.legend(loc="lower right", fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_reliability_diagram(bins: dict, path: Path, title: str) -> Path:
    """Accuracy against top-class confidence per bin, with the diagonal of perfect calibration."""
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    edges = np.asarray(bins["bin_edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    accuracy = np.asarray([np.nan if value is None else value for value in bins["accuracy"]], dtype=float)
    axis.bar(centres, np.nan_to_num(accuracy), width=edges[1] - edges[0], edgecolor="black", alpha=0.7, label="accuracy")
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    axis.set_xlabel("top-class probability")
    axis.set_ylabel("share correct")
    axis.set_title(f"{title}\nECE {bins['expected_calibration_error']:.3f}")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _png_data_uri(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def gallery_choices(labels: np.ndarray, probabilities: np.ndarray, per_class: int) -> dict[int, dict[str, list[int]]]:
    """For every class, the most confident correct and the most confident wrong test images (row indices)."""
    predictions = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    chosen = {}
    for index in range(probabilities.shape[1]):
        of_class = np.flatnonzero(labels == index)
        correct = of_class[predictions[of_class] == index]
        wrong = of_class[predictions[of_class] != index]
        chosen[index] = {
            "correct": correct[np.argsort(-confidence[correct], kind="stable")][:per_class].tolist(),
            "wrong": wrong[np.argsort(-confidence[wrong], kind="stable")][:per_class].tolist(),
        }
    return chosen


_GALLERY_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
.row { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; padding: 0.4em; border: 1px solid #ddd; border-radius: 4px; background: #fafafa; }
figure.wrong { border-color: #d55; }
figure img { width: 160px; height: 160px; image-rendering: auto; }
figcaption { font-size: 0.8em; max-width: 330px; }
.none { color: #777; font-style: italic; }
"""


def write_gallery(
    path: Path, ensemble: Ensemble, images: CachedImages, probabilities: np.ndarray, *, site: str, per_class: int, method: str
) -> int:
    """gallery.html: per class, correct and wrong test images with their Grad-CAM overlays, embedded (opens offline)."""
    labels = np.asarray(images.labels, dtype=np.int64)
    chosen = gallery_choices(labels, probabilities, per_class)
    rows = sorted({row for groups in chosen.values() for group in groups.values() for row in group})
    maps: dict[int, np.ndarray] = {}
    if rows:
        pixels = np.asarray(images.images[rows])
        predicted = torch.as_tensor(probabilities[rows].argmax(axis=1), dtype=torch.int64)
        heatmaps, _ = ensemble.explain(normalise_pixels(pixels, ensemble.saved.mean, ensemble.saved.std), predicted, method=method)
        maps = dict(zip(rows, heatmaps))
    classes = ensemble.classes
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Grad-CAM gallery - {html.escape(site)}</title><style>{_GALLERY_STYLE}</style></head><body>",
        f"<h1>Grad-CAM gallery - site {html.escape(site)}</h1>",
        f"<p>{len(labels)} test images; {method} maps of the predicted class"
        + (f", averaged over {len(ensemble)} models" if len(ensemble) > 1 else "")
        + ". Red: regions that raised the predicted class's score. Up to "
        f"{per_class} most confident correct and wrong predictions per class.</p>",
    ]
    for index, name in enumerate(classes):
        parts.append(f"<h2>{html.escape(name)} ({int((labels == index).sum())} images)</h2>")
        for group in ("correct", "wrong"):
            parts.append(f"<h3>{group}</h3><div class='row'>")
            if not chosen[index][group]:
                parts.append(f"<p class='none'>no {group} predictions</p>")
            for row in chosen[index][group]:
                original = np.asarray(images.images[row])
                overlay = overlay_heatmap(original, maps[row])
                prediction = int(probabilities[row].argmax())
                caption = (
                    f"{html.escape(str(images.image_ids[row]))}: true {html.escape(name)}, predicted "
                    f"{html.escape(classes[prediction])} ({probabilities[row, prediction]:.2f}); "
                    f"p({html.escape(name)}) = {probabilities[row, index]:.2f}"
                )
                parts.append(
                    f"<figure class='{group}'><img alt='image' src='{_png_data_uri(original)}'>"
                    f"<img alt='Grad-CAM overlay' src='{_png_data_uri(overlay)}'><figcaption>{caption}</figcaption></figure>"
                )
            parts.append("</div>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
    return len(rows)


def write_site_report(
    folder: Path,
    ensemble: Ensemble,
    images: CachedImages,
    *,
    site: str,
    gallery_per_class: int = 3,
    method: str = "gradcam",
    batch_size: int = 64,
    extra: dict | None = None,
) -> dict:
    """Write a site's report folder for the given (test) images; returns the metrics written to metrics.json."""
    if len(images) == 0:
        raise DataError(f"site {site} has no test images to report on; give the site images or change the split fractions")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    classes = ensemble.classes
    probabilities = predict_images(ensemble, images, batch_size)
    labels = np.asarray(images.labels, dtype=np.int64)
    metrics = classification_metrics(labels, probabilities, classes)
    isic = isic_scores(labels, probabilities, classes)
    write_table(folder, per_class_rows(metrics, isic), TABLE_COLUMNS)
    plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), classes, folder / "confusion_matrix.png", f"Site {site}: confusion matrix")
    plot_roc_curves(labels, probabilities, classes, folder / "roc_curves.png", f"Site {site}: ROC curves (one vs rest)")
    calibration = calibration_bins(probabilities, labels)
    plot_reliability_diagram(calibration, folder / "reliability.png", f"Site {site}: reliability")
    gallery_images = write_gallery(
        folder / "gallery.html", ensemble, images, probabilities, site=site, per_class=gallery_per_class, method=method
    )
    report = {
        "site": site,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "models": [str(path) for path in ensemble.paths],
        "classes": classes,
        "num_examples": int(labels.size),
        "metrics": metrics,
        "isic": isic,
        "calibration": calibration,
        "gallery": {"method": method, "images": gallery_images, "per_class": gallery_per_class},
        **(extra or {}),
    }
    write_json_atomically(folder / "metrics.json", report)
    return report


def site_report_folder(source, context, site: str) -> Path:
    """Where a site writes its end-of-run report: beside the simulation's site tables, or under the node's `report-dir`."""
    safe_site = safe_site_name(site)
    manifest_path = getattr(source, "manifest_path", None)
    if manifest_path is not None:
        return Path(manifest_path).parent / safe_site / "report"
    root = Path(str(dict(context.node_config).get(REPORT_DIR_NODE_KEY, DEFAULT_REPORT_ROOT))).expanduser()
    return root / safe_site / f"run-{context.run_id}"


def write_end_of_run_report(
    folder: Path,
    model,
    run,
    images: CachedImages,
    *,
    site: str,
    server_round: int,
    train_images: CachedImages | None = None,
    device: torch.device | None = None,
    seed: int = 0,
    extra: dict | None = None,
) -> dict:
    """The site report of the final global model (in memory) on the site's test images; `extra` adds entries (e.g. feedback counts).

    With `run.report.personalise_epochs` > 0 the site also fine-tunes the global model on
    `train_images` into its personalised model, saves it as `personalised_model.pt` (for the site's
    own web app), writes its report under `personalised/`, and puts both models' figures side by
    side in the global report's `personalised` entry.
    """
    global_report = _write_model_report(
        folder, model, run, images, site=site, description=f"global model after round {server_round}",
        extra={"round": server_round, **(extra or {})},
    )
    if run.report.personalise_epochs <= 0:
        return global_report
    from shared.models.classifier import save_classifier
    from shared.personalisation import personalise

    if train_images is None or device is None:
        raise ValueError("personalising needs the site's training images and device")
    tuned = personalise(model, train_images, run, device=device, seed=seed)
    model_path = save_classifier(
        Path(folder) / "personalised_model.pt", tuned, model_name=run.model.name, classes=list(run.classes),
        preprocess=run.preprocess,
        metadata={"mode": "personalised", "site": site, "round": server_round, "epochs": run.report.personalise_epochs},
    )
    description = f"global model after round {server_round}, fine-tuned on {site}'s training split"
    personal_report = _write_model_report(
        Path(folder) / "personalised", tuned, run, images, site=site, description=description,
        extra={"round": server_round, "model_file": str(model_path)},
    )
    global_report["personalised"] = {
        name: {"global": global_report["metrics"][name], "personalised": personal_report["metrics"][name]}
        for name in ("balanced_accuracy", "accuracy", "macro_auc")
    } | {"model_file": str(model_path), "epochs": run.report.personalise_epochs}
    write_json_atomically(Path(folder) / "metrics.json", global_report)
    return global_report


def _write_model_report(folder: Path, model, run, images: CachedImages, *, site: str, description: str, extra: dict) -> dict:
    """One in-memory model's site report."""
    from shared.models.classifier import SavedClassifier, model_normalisation

    mean, std = model_normalisation(model)
    saved = SavedClassifier(model_name=run.model.name, classes=list(run.classes), preprocess=run.preprocess, mean=mean, std=std)
    ensemble = Ensemble([model.eval()], saved, [])
    return write_site_report(
        folder, ensemble, images, site=site, gallery_per_class=run.report.gallery_per_class,
        method=run.report.gradcam_method, batch_size=run.train.batch_size * 2,
        extra={"models": [description], **extra},
    )
