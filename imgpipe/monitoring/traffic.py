"""What ``imgpipe monitor`` checks: the logged traffic of the champion version against its
reference profile (``imgpipe.monitoring.reference``), the logged images against the input suite,
and the labelled feedback's accuracy against the champion's test accuracy; and whether that calls
for retraining.

    traffic = read_traffic(log_dir, "elpv_defects", version=2, skip=already_read)
    check = check_traffic(traffic, reference, served, params, docs=report_dir / "data_docs")
    check["retrain"], check["reasons"]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgpipe.core.params import MonitorParams, ValidateParams
from imgpipe.export.savedmodel import BYTES_INPUT, EXAMPLE_IMAGE_KEY
from imgpipe.monitoring.drift import class_test, confidence_test, mmd_test, predicted_counts
from imgpipe.monitoring.reference import Reference, image_stats

PROBABILITIES = "probabilities"


TESTS = 3
"""The drift tests of a check (embedding, predicted classes, confidence): each alarms below
``monitor.false_alarm_rate / TESTS``."""


@dataclass
class Traffic:
    """What the champion version answered since the last check, from the request log: every
    request counted, a uniform sample of at most ``monitor.max_requests`` kept to compare."""

    encoded: list[bytes] = field(default_factory=list)
    """The sample's images..."""
    probabilities: list[np.ndarray] = field(default_factory=list)
    """...and the answers they got."""
    requests: int = 0
    """Every image the version answered (the sample is drawn from them)."""
    first_time: int | None = None
    last_time: int | None = None
    files: list[str] = field(default_factory=list)
    """The files read, relative to the log root (a quarantined one too: never read again)."""
    quarantined: dict[str, str] = field(default_factory=dict)
    """Files with a corrupt record: why; the records before it are read."""
    other_versions: Counter[str] = field(default_factory=Counter)
    """Rows answered by other models or versions: counted, not compared."""


def _answers(record: Any) -> tuple[str, list[bytes], np.ndarray] | None:
    """(what answered, the images, their probabilities) of one PredictionLog; None for a call
    that carries no image (another signature)."""
    from serving.tensors import to_ndarray

    spec = record.log_metadata.model_spec
    answered = f"{spec.name} v{spec.version.value}"
    kind = record.WhichOneof("log_type")
    if kind == "predict_log":
        request, response = record.predict_log.request, record.predict_log.response
        if BYTES_INPUT not in request.inputs or PROBABILITIES not in response.outputs:
            return f"{answered} (other signature)", [], np.zeros((1, 0))
        images = [bytes(i) for i in to_ndarray(request.inputs[BYTES_INPUT]).reshape(-1)]
        return answered, images, to_ndarray(response.outputs[PROBABILITIES])
    if kind == "classify_log":
        examples = record.classify_log.request.input.example_list.examples
        images = [e.features.feature[EXAMPLE_IMAGE_KEY].bytes_list.value[0] for e in examples]
        scores = [
            [c.score for c in row.classes]
            for row in record.classify_log.response.result.classifications
        ]
        return answered, images, np.array(scores, np.float32)
    return None


def read_traffic(
    log_dir: Path,
    model_name: str,
    version: int,
    skip: Iterable[str] = (),
    max_requests: int = 2000,
    seed: int = 0,
) -> Traffic:
    """Every image of a logged Predict (bytes signature) or Classify call that ``model_name``
    version ``version`` answered, in the closed log files under ``log_dir`` not in ``skip``,
    streamed file by file: counted, and sampled uniformly (reservoir, ``seed``) to at most
    ``max_requests``. A file with a corrupt or cut-off record is read up to it and
    quarantined with the reason, not read again."""
    from serving.request_log import closed_logs, read_tfrecords
    from serving.tensors import API_MODULES, LOG_MODULES, apis

    messages = apis(API_MODULES + LOG_MODULES)
    rng = np.random.default_rng(seed)
    wanted = f"{model_name} v{version}"
    traffic = Traffic()
    skipped = set(skip)
    for path in closed_logs(log_dir):
        relative = str(path.relative_to(log_dir))
        if relative in skipped:
            continue
        traffic.files.append(relative)
        try:
            for data in read_tfrecords(path):
                record = messages.prediction_log_pb2.PredictionLog.FromString(data)
                answers = _answers(record)
                if answers is None:
                    continue
                answered, images, probs = answers
                if answered != wanted:
                    traffic.other_versions[answered] += max(1, len(images))
                    continue
                when = int(record.log_metadata.timestamp_secs)
                traffic.first_time = min(traffic.first_time or when, when)
                traffic.last_time = max(traffic.last_time or when, when)
                for image, row in zip(images, probs, strict=True):
                    traffic.requests += 1
                    if len(traffic.encoded) < max_requests:
                        traffic.encoded.append(image)
                        traffic.probabilities.append(row)
                    else:  # Algorithm R: each of the n so far is kept with probability k/n
                        slot = int(rng.integers(traffic.requests))
                        if slot < max_requests:
                            traffic.encoded[slot], traffic.probabilities[slot] = image, row
        except Exception as error:  # a corrupt record or an unreadable message
            traffic.quarantined[relative] = str(error)
    return traffic


def input_expectations(reference: Reference, validate: ValidateParams, mostly: float) -> list[Any]:
    """The logged images' checks, in validate's style: size within validate's bounds, a mode the
    reference images have, brightness within the reference's range; each for ``mostly`` of
    the images (a stray image is no failure of the input)."""
    from great_expectations import expectations as gxe

    low, high = np.nanpercentile(reference.brightness, [0.5, 99.5])
    return [
        gxe.ExpectColumnValuesToBeBetween(
            column="width", min_value=validate.min_side, max_value=validate.max_side, mostly=mostly
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="height", min_value=validate.min_side, max_value=validate.max_side, mostly=mostly
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="mode", value_set=sorted(set(reference.mode.tolist())), mostly=mostly
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="brightness",
            min_value=round(float(low), 2),
            max_value=round(float(high), 2),
            mostly=mostly,
            description="mean brightness within the reference images' 0.5-99.5th percentiles",
        ),
    ]


def check_traffic(
    traffic: Traffic,
    reference: Reference,
    embed: Any,
    params: MonitorParams,
    validate: ValidateParams,
    docs: Path,
    seed: int = 0,
) -> dict[str, Any]:
    """The drift tests and input checks of ``traffic`` (``embed``: encoded images -> pooled
    features, the served version's ``embedding`` signature). Below ``min_requests`` images,
    nothing is tested."""
    import pandas as pd

    from imgpipe.data.expectations import describe_outcome, run_suites

    count = traffic.requests
    result: dict[str, Any] = {
        "requests": count,
        "compared": len(traffic.encoded),
        "other_versions": dict(traffic.other_versions),
        "files": len(traffic.files),
        "quarantined_files": dict(traffic.quarantined),
        "enough": count >= params.min_requests,
        "test_p_value": params.false_alarm_rate / TESTS,
    }
    if count:
        result["first_time"], result["last_time"] = traffic.first_time, traffic.last_time
    if not result["enough"]:
        return result
    probs = np.stack(traffic.probabilities)
    embeddings = reference.project(embed(traffic.encoded))
    embedding = mmd_test(
        reference.embeddings, embeddings, permutations=params.permutations, seed=seed
    )
    classes = class_test(reference.probabilities, probs, len(reference.class_names))
    confidence = confidence_test(reference.probabilities, probs)
    stats = pd.DataFrame(image_stats(traffic.encoded))
    outcomes = run_suites(
        {"requests": (stats, input_expectations(reference, validate, params.input_mostly), [])},
        docs,
        "request_log",
    )
    failed = [describe_outcome(o) for o in outcomes if not o["success"]]
    predicted = predicted_counts(probs, len(reference.class_names))
    expected = predicted_counts(reference.probabilities, len(reference.class_names))
    result.update(
        embedding_mmd=embedding.statistic,
        embedding_p=embedding.p_value,
        embedding_drift=embedding.p_value < result["test_p_value"],
        class_chi2=classes.statistic,
        class_p=classes.p_value,
        confidence_ks=confidence.statistic,
        confidence_p=confidence.p_value,
        prediction_drift=min(classes.p_value, confidence.p_value) < result["test_p_value"],
        predicted={
            str(name): int(n) for name, n in zip(reference.class_names, predicted, strict=True)
        },
        reference_predicted={
            str(name): int(n) for name, n in zip(reference.class_names, expected, strict=True)
        },
        mean_confidence=float(np.max(probs, axis=1).mean()),
        reference_mean_confidence=float(np.max(reference.probabilities, axis=1).mean()),
        input_checks=len(outcomes),
        input_failures=failed,
        embeddings=embeddings,
    )
    return result


def feedback_check(
    summary: dict[str, Any], champion_accuracy: float | None, params: MonitorParams
) -> dict[str, Any]:
    """The labelled feedback's accuracy (``imgpipe.monitoring.scoring.summarise`` of the scored
    feedback) against the champion's test accuracy: a drop when the whole 95 % interval lies more
    than ``max_accuracy_drop`` below it, with at least ``min_requests`` labelled images."""
    labelled = summary.get("labelled", 0)
    result: dict[str, Any] = {"labelled": labelled}
    if not labelled:
        return result
    low, high = summary["accuracy_interval"]
    result.update(accuracy=summary["accuracy"], accuracy_low=low, accuracy_high=high)
    if champion_accuracy is not None:
        result["champion_test_accuracy"] = champion_accuracy
        result["accuracy_drop"] = bool(
            labelled >= params.min_requests and high < champion_accuracy - params.max_accuracy_drop
        )
    return result


def reasons_to_retrain(check: dict[str, Any], feedback: dict[str, Any]) -> list[str]:
    """Why to retrain, in words; empty when nothing crossed its threshold. An input check that
    more than ``1 - monitor.input_mostly`` of the images fail is input drift too."""
    reasons = []
    if check.get("embedding_drift"):
        reasons.append(
            f"embedding drift: MMD {check['embedding_mmd']:.4f}, p = {check['embedding_p']:.4f}"
        )
    if check.get("prediction_drift"):
        reasons.append(
            f"prediction drift: classes p = {check['class_p']:.4g}, "
            f"confidence p = {check['confidence_p']:.4g}"
        )
    for failure in check.get("input_failures", []):
        reasons.append(f"input drift: {failure}")
    if feedback.get("accuracy_drop"):
        reasons.append(
            f"accuracy drop: live {feedback['accuracy']:.4f} (95% interval "
            f"{feedback['accuracy_low']:.4f} to {feedback['accuracy_high']:.4f}) against the "
            f"champion's test accuracy {feedback['champion_test_accuracy']:.4f}"
        )
    return reasons
