"""Distillation: a student learns a teacher's probabilities (an ensemble's, ``imgpipe
ensemble``) of each view it trains on, instead of the view's label.

The teacher's probabilities carry what its members learnt beyond the label (how likely the other
classes are for this cell), and its decision with them (each member's folded temperature and
correction), so a student that matches them needs no decision of its own: its decision file
folds in nothing more (temperature 1, no offset). The driver, which trains the student on
finetune's recipe, is ``pipelines.distill``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imgpipe.core.errors import InputError
from imgpipe.model.training import DECISION

LOSS = "categorical_crossentropy"
"""The student's loss: the cross-entropy of its probabilities against the teacher's."""


def soft_targets(batches: Any, teacher: Any) -> Any:
    """``batches`` of (image, label) as (image, the teacher's probabilities of that image):
    the teacher sees each view the student is trained on, in inference mode."""
    return batches.map(lambda images, _: (images, teacher(images, training=False)))


def check_teacher(teacher: Any, name: str, image_size: int, classes: int) -> None:
    """Refuse, naming ``name``, a teacher of another image size or class count than the
    student's."""
    shape, given = tuple(teacher.input_shape[1:3]), int(teacher.output_shape[-1])
    if shape != (image_size, image_size) or given != classes:
        raise InputError(
            f"{name}: the teacher takes {shape} images and gives {given} classes, but the "
            f"student takes ({image_size}, {image_size}) and the data has {classes} classes"
        )


def student_decision(teacher_model: Path, classes: int) -> dict[str, Any]:
    """The student's decision file: the teacher's objective (read beside ``teacher_model``),
    nothing folded in beyond what the teacher's probabilities carry."""
    beside = teacher_model.with_name(DECISION)
    decided = json.loads(beside.read_text(encoding="utf-8")) if beside.is_file() else {}
    return {
        "objective": decided.get("objective", "accuracy"),
        "temperature": 1.0,
        "offset": [0.0] * classes,
        "fitted_on": f"distilled from {teacher_model}",
    }
