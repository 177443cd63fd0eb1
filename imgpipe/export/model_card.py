"""The model card beside every exported model: what it is, the data and its licence, the test
metrics and slices, the deployment artifacts and their parity, and the limits a user must know."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imgpipe.core.params import ExportParams, ModelParams
from imgpipe.export.savedmodel import BYTES_INPUT, IMAGES_SIGNATURE, TFLITE_FILES


def model_card(
    model_name: str,
    model_params: ModelParams,
    image_size: int,
    labels: Sequence[str],
    evaluation: dict[str, Any],
    report: dict[str, Any],
    params: ExportParams,
) -> str:
    """The model card: what the model is, the data and its licence, test metrics, slices,
    deployment artifacts and their parity, and the limits a user must know."""
    test = evaluation["test"]
    lines = [
        f"# Model card: {model_name}",
        "",
        "## Model",
        f"- {model_params.backbone} backbone ({model_params.weights or 'random'} weights), "
        f"{image_size} px input, fine-tuned; classes: {', '.join(labels)}.",
        "- Preprocessing is inside the model: send encoded images (`serving_default`, input "
        f"`{BYTES_INPUT}`) or uint8 RGB tensors of any size (`{IMAGES_SIGNATURE}`).",
        "",
        "## Data",
        f"- {params.data_description or 'not described (set export.data_description)'}",
        f"- Licence: {params.data_licence}.",
        f"- Test split: {test['images']} images, never used for training or model selection.",
        "",
        "## Test metrics",
        "| metric | value |",
        "|---|---|",
        *(
            f"| {m.replace('_', ' ')} | {test[m]:.4f} |"
            for m in ("accuracy", "balanced_accuracy", "macro_f1", "ece")
        ),
        "",
        "| class | precision | recall | F1 | images |",
        "|---|---|---|---|---|",
        *(
            f"| {label} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | "
            f"{c['support']} |"
            for label, c in test["per_class"].items()
        ),
    ]
    if evaluation.get("slices"):
        lines += [
            "",
            "## Slices",
            "| slice | images | accuracy | balanced accuracy | macro-F1 |",
            "|---|---|---|---|---|",
        ]
        for column, values in evaluation["slices"].items():
            for value, m in values.items():
                lines.append(
                    f"| {column} = {value} | {m['images']} | {m['accuracy']:.4f} | "
                    f"{m['balanced_accuracy']:.4f} | {m['macro_f1']:.4f} |"
                )
    lines += [
        "",
        "## Artifacts and parity (whole test split)",
        "| artifact | size (MB) | accuracy | top-1 agreement with SavedModel |",
        "|---|---|---|---|",
        f"| SavedModel | {report['sizes_mb']['saved_model']:.1f} | "
        f"{report['parity']['saved_model']['accuracy']:.4f} | - |",
    ]
    for kind in TFLITE_FILES:
        if f"tflite_{kind}" in report["parity"]:
            p = report["parity"][f"tflite_{kind}"]
            lines.append(
                f"| TFLite {kind} | {report['sizes_mb'][f'tflite_{kind}']:.1f} | "
                f"{p['accuracy']:.4f} | {p['top1_agreement']:.4f} |"
            )
    weak = [label for label, c in test["per_class"].items() if c["recall"] < 0.5]
    lines += [
        "",
        "## Limits",
        f"- Trained and tested on one data set; expect lower accuracy on images from other "
        f"cameras, resolutions or {', '.join(evaluation.get('slices', {})) or 'sources'}.",
    ]
    if weak:
        lines.append(
            f"- Classes recognised less than half the time on the test split: {', '.join(weak)}."
        )
    lines.append(
        f"- Expected calibration error {test['ece']:.3f}: treat probabilities as scores, not "
        "as calibrated likelihoods, unless this is small."
    )
    if "tflite_int8" in report["parity"]:
        lines.append(
            "- The full-integer int8 TFLite model outputs probabilities in steps of 1/256; "
            "its quantized activations can flip the top-1 class of images the float model "
            "scores with a small margin (see its agreement above)."
        )
    return "\n".join(lines) + "\n"
