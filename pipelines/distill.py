"""``imgpipe distill``: a teacher (an ensemble, ``imgpipe ensemble``) distilled into one student
of the configured backbone, at one model's cost; its quantization-aware int8 TFLite file is
what a device runs.

The student is trained as the production run is (components.finetune), with no tunable of its
own: from train's frozen-phase model, the top of its base unfrozen, on every non-test image (the
images the teacher trained on), a fresh view of each image every epoch, finetune's schedule,
weight averaging, seed and quantization-aware epochs (params.yaml's model, augment and finetune
sections). What it learns is the teacher's probabilities of each view (imgpipe.model.distill).

The output folder is finetune's: model.keras, decision.json (nothing folded in: the teacher's
probabilities carry its decision), curves.png, plus history.csv and the run's figures
(distill.json). evaluate and export take it as they take finetune's (``--tuned``,
``--decision``), so export's parity report is the student's.

>>> run(Path("outputs/ensemble"), Path("outputs/student"), load_params())  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from imgpipe.core.errors import InputError
from imgpipe.core.fileio import atomic_path, write_json_atomic
from imgpipe.core.params import sections
from imgpipe.data.labels import read_labels
from imgpipe.data.manifest import LABELS, SHARDS
from imgpipe.data.tfrecords import count_records, split_files
from imgpipe.model.training import CURVES, DECISION, MODEL
from pipelines.runner import default_paths
from pipelines.stages import STAGES

SUMMARY = "distill.json"
HISTORY = "history.csv"


def run(
    teacher: Path,
    out: Path,
    params: dict[str, Any],
    *,
    dataset: Path | None = None,
    trained: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the student of ``teacher`` (a folder holding model.keras and decision.json) on
    ``dataset`` (ingest's output) from ``trained`` (train's model), both at their DVC paths by
    default, into the folder ``out`` (written atomically). Returns the figures also written to
    ``out``/distill.json."""
    import keras

    from components.finetune import ALL_NON_TEST, prepare, quantization_aware_phase
    from imgpipe.data.datasets import image_dataset
    from imgpipe.model import backbones, distill
    from imgpipe.model.checkpoints import AveragedWeights
    from imgpipe.model.distribute import FLOAT32, set_precision
    from imgpipe.model.ensemble import load_members
    from imgpipe.model.training import (
        HEAD_NAME,
        EpochLogger,
        deterministic,
        plot_curves,
        write_history,
    )

    typed = sections(("model", "augment", "finetune"), params)
    model_params, views, tuning = typed["model"], typed["augment"], typed["finetune"]
    stage = default_paths(STAGES["finetune"], params)
    dataset, trained = dataset or stage["dataset"], trained or stage["trained"]
    teacher_file = teacher / MODEL
    for path in (teacher_file, trained, dataset / LABELS):
        if not path.is_file():
            raise InputError(
                f"{path}: no such file (distill reads the teacher, train's model and ingest's "
                "output: `dvc repro train` first)"
            )
    size = backbones.image_size(model_params)
    classes = len(read_labels(dataset / LABELS))
    [teacher_model] = load_members([teacher_file])
    distill.check_teacher(teacher_model, str(teacher_file), size, classes)

    files = split_files(dataset / SHARDS, "train") + split_files(dataset / SHARDS, "val")
    images = count_records(files)
    steps = math.ceil(images / tuning.batch_size)
    keras.utils.set_random_seed(tuning.seed)
    deterministic()
    student, trainable = prepare(trained, model_params, tuning, steps, tuning.learning_rate)
    student.compile(optimizer=student.optimizer, loss=distill.LOSS, metrics=["accuracy"])
    rows: list[dict[str, Any]] = []
    callbacks: list[keras.callbacks.Callback] = [
        EpochLogger("distill", 0, tuning.epochs, rows, progress, steps)
    ]
    if tuning.ema_momentum is not None:  # first: the logger sees the averaged weights
        callbacks.insert(0, AveragedWeights(resumed=False))
    batches = image_dataset(
        files,
        size,
        tuning.batch_size,
        shuffle_seed=tuning.seed,
        epochs=tuning.epochs,
        count=images,
        views=views,
    )
    started = time.perf_counter()
    student.fit(
        distill.soft_targets(batches, teacher_model),
        steps_per_epoch=steps,
        epochs=tuning.epochs,
        callbacks=callbacks,
        shuffle=False,  # the dataset shuffles itself, seeded
        verbose=0,
    )
    seconds = time.perf_counter() - started
    # After the last epoch the model holds the averaged weights (AveragedWeights): keep those,
    # without the optimizer, as finetune keeps its last checkpoint.
    with atomic_path(out) as staged:
        staged.mkdir()
        student.save(staged / MODEL)
        student = keras.models.load_model(staged / MODEL, compile=False)
        set_precision(student, FLOAT32, keep_float32=HEAD_NAME)
        quantized: dict[str, Any] = {}
        quantize_rows: list[dict[str, Any]] = []
        if tuning.quantization_aware_epochs:
            student, quantized = quantization_aware_phase(
                student,
                model_params,
                tuning,
                views,
                files,
                [],
                (size, tuning.batch_size, steps, images, 0),
                tuning.learning_rate * tuning.final_lr_fraction,
                (len(rows), quantize_rows, progress),
                teacher=teacher_model,
            )
        student.save(staged / MODEL)  # without the optimizer's state
        write_json_atomic(staged / DECISION, distill.student_decision(teacher_file, classes))
        write_history(staged / HISTORY, [*rows, *quantize_rows])
        plot_curves(
            [*rows, *quantize_rows],
            staged / CURVES,
            f"{model_params.backbone} {size}px student of {teacher}: distillation",
        )
        last = (quantize_rows or rows)[-1]
        summary = {
            "distill": {
                "teacher": str(teacher),
                "trained_on": ALL_NON_TEST,
                "training_images": images,
                "epochs": len(rows),
                **quantized,
                "teacher_agreement": round(float(last["accuracy"]), 6),
                "loss": round(float(last["loss"]), 6),
                "trainable_base_layers": trainable,
                "seconds": round(seconds, 2),
                "images_per_second": round(tuning.epochs * steps * tuning.batch_size / seconds, 1),
            }
        }
        write_json_atomic(staged / SUMMARY, summary)
    return summary


def describe(summary: dict[str, Any], out: Path) -> str:
    result = summary["distill"]
    return (
        f"{out}: a student of {result['teacher']} trained on {result['training_images']} "
        f"images for {result['epochs']} epochs in {result['seconds']:.0f} s; it agrees with the "
        f"teacher on {result['teacher_agreement']:.1%} of its last epoch's views"
    )
