"""Several trained classifiers (seeds, or the folds of ``imgpipe crossval``) as one model that
averages their probabilities: one file that evaluate, export and the servers take like any
fine-tuned model (``imgpipe ensemble``).

Each member keeps its own weights and decision (a temperature or prior correction folded into
its output layer): the ensemble's own ``decision.json`` folds in nothing more (temperature 1, no
offset). The ensemble is built as ``training.assemble`` builds a classifier (base, ``gap``,
head), so evaluate's Grad-CAM, export's signatures (the ``embedding`` the monitor compares
traffic on: the members' pooled features side by side) and its decision helpers read it as
they read one model. The members are softmax classifiers of one image size and one set of
classes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras

from imgpipe.core.errors import InputError
from imgpipe.core.fileio import atomic_path
from imgpipe.model.backbones import BASE_NAME
from imgpipe.model.training import DECISION, HEAD_NAME, MODEL, POOLED_LAYER, assemble, base_of


def average(members: Sequence[keras.Model], names: Sequence[str] | None = None) -> keras.Model:
    """One classifier of the shape ``training.assemble`` builds, so that every stage and tool
    that reads a fine-tuned model reads it: a base (every member's base, their feature maps
    side by side) -> the pooling (``gap``: the members' pooled features side by side) -> a head
    (each member's head on its own slice, then the mean of their probabilities, the layer
    named ``probabilities``). ``names`` (the members' files) name a mismatch in errors."""
    names = list(names or (f"member {i}" for i in range(len(members))))
    if len(members) < 2:
        raise InputError(f"an ensemble needs at least two models; got {len(members)}")
    from imgpipe.model import ordinal

    shape, classes = members[0].input_shape[1:], members[0].output_shape[-1]
    for name, member in zip(names, members, strict=True):
        layers = {layer.name for layer in member.layers}
        if not {BASE_NAME, POOLED_LAYER, HEAD_NAME} <= layers:
            raise InputError(
                f"{name}: not a classifier as train and finetune write one (its layers "
                f"{sorted(layers)} lack {BASE_NAME!r}, {POOLED_LAYER!r} or {HEAD_NAME!r})"
            )
        head = member.get_layer(HEAD_NAME)
        if isinstance(head.get_layer(ordinal.NAME), ordinal.OrdinalProbabilities):
            raise InputError(f"{name}: an ordinal head; an ensemble averages softmax classifiers")
        if member.input_shape[1:] != shape or member.output_shape[-1] != classes:
            raise InputError(
                f"{name}: takes {member.input_shape[1:]} and gives {member.output_shape[-1]} "
                f"classes, but {names[0]} takes {shape} and gives {classes}: an ensemble's "
                "members share their image size and classes"
            )
    bases = [base_of(m) for m in members]
    image = keras.Input(shape, name="image")
    maps = [
        keras.Model(b.input, b.output, name=f"{BASE_NAME}_{i}")(image) for i, b in enumerate(bases)
    ]
    base = keras.Model(image, keras.layers.Concatenate(name="maps")(maps), name=BASE_NAME)
    widths = [int(m.shape[-1]) for m in maps]  # members of other backbones differ
    pooled = keras.Input((sum(widths),), name="pooled")
    probabilities = []
    for i, member in enumerate(members):
        head = member.get_layer(HEAD_NAME)
        own = keras.Model(head.input, head.output, name=f"{HEAD_NAME}_{i}")
        start = sum(widths[:i])
        probabilities.append(own(pooled[:, start : start + widths[i]]))
    mean = keras.layers.Average(name=ordinal.NAME)(probabilities)
    return assemble(base, keras.Model(pooled, mean, name=HEAD_NAME))


def load_members(paths: Sequence[Path]) -> list[keras.Model]:
    """The member models, each refused by name when it cannot be read."""
    from imgpipe.model import ordinal, quantization  # noqa: F401 (register their layers)

    members = []
    for path in paths:
        if not Path(path).is_file():
            raise InputError(f"{path}: no such model file")
        try:
            members.append(keras.models.load_model(path, compile=False))
        except (OSError, ValueError, TypeError) as exc:
            raise InputError(f"{path}: not a Keras model file ({exc})") from exc
    return members


def write_ensemble(paths: Sequence[Path], out: Path) -> dict[str, Any]:
    """The ensemble of the model files ``paths`` into the folder ``out`` (atomically):
    ``model.keras`` and ``decision.json`` (the members' objective, nothing folded in beyond
    theirs; their files). Each member's objective is read from the decision file beside it;
    members fitted for different objectives are refused. Returns the decision."""
    if len(paths) < 2:
        raise InputError(f"an ensemble needs at least two models; got {len(paths)}")
    objectives = set()
    for path in paths:
        beside = Path(path).with_name(DECISION)
        decided = json.loads(beside.read_text()) if beside.is_file() else {}
        objectives.add(json.dumps(decided.get("objective", "accuracy")))
    if len(objectives) > 1:
        raise InputError(
            f"the members' decisions serve different objectives ({', '.join(sorted(objectives))}): "
            "an ensemble averages models fitted for one"
        )
    model = average(load_members(paths), [str(p) for p in paths])
    decision = {
        "objective": json.loads(objectives.pop()),
        "temperature": 1.0,
        "offset": [0.0] * int(model.output_shape[-1]),
        "members": [str(p) for p in paths],
    }
    with atomic_path(out) as staged:
        staged.mkdir()
        model.save(staged / MODEL)
        (staged / DECISION).write_text(json.dumps(decision, indent=2) + "\n", encoding="utf-8")
    return decision
