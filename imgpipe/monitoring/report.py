"""The page a person on call reads after ``imgpipe monitor``: one self-contained HTML file.

From the top: a verdict banner (what was found, what was started, what to do now), the check's
figures with times in ISO form, the trend across this version's checks (the drift tests'
p-values against their threshold, the requests per check, the live accuracy with its interval
against the champion's), where the served traffic sits against the reference (embeddings,
predicted classes, top-1 confidence), and the logged images farthest from the reference, each
with what the model answered. Plots are PNGs inside the page (no network, no files beside it).
"""

from __future__ import annotations

import base64
import datetime
import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from imgpipe.monitoring.reference import Reference

FARTHEST = 12
"""Logged images shown, farthest from the reference first (a fixed layout, not a tunable)."""


def iso(seconds: float | None) -> str:
    """Epoch seconds as an ISO 8601 UTC time; an empty string for none."""
    if seconds is None:
        return ""
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="seconds")


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def verdict(
    check: Mapping[str, Any], reasons: Sequence[str], retraining: Mapping[str, Any] | None
) -> tuple[str, str, list[str]]:
    """(level, headline, what to do): ``alarm`` when something crossed its threshold, ``wait``
    when there were too few requests to decide, ``ok`` otherwise."""
    if reasons:
        todo = ["Look at the farthest images below: is this new data the model should learn?"]
        if retraining and retraining.get("how") not in (None, "none", "commands"):
            todo.insert(0, "A retraining was started: the blessing gate decides whether it serves.")
        elif retraining:
            todo.insert(0, "Run the retraining commands below, or start it with --retrain.")
        else:
            todo.insert(0, "A retraining is already open for this version: wait for it.")
        return "alarm", "Drift found: " + "; ".join(reasons), todo
    if not check.get("enough"):
        return (
            "wait",
            f"No verdict: {check.get('requests', 0)} logged requests, fewer than the minimum",
            ["Nothing to do: the files wait for the next check."],
        )
    return "ok", "No drift, no accuracy drop", ["Nothing to do."]


def trend_figure(history: Sequence[Mapping[str, Any]], threshold: float | None) -> str | None:
    """This version's checks side by side: the three drift tests' p-values (log scale) with the
    per-test threshold, the requests of each check, and the live accuracy with its interval
    against the champion's test accuracy. None before there are two checks."""
    if len(history) < 2:
        return None
    plt = _pyplot()
    steps = [h["step"] for h in history]
    fig, (tests, volume, accuracy) = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, label in (
        ("embedding_p", "embedding MMD"),
        ("class_p", "predicted classes"),
        ("confidence_p", "confidence"),
    ):
        points = [(h["step"], h["check"].get(key)) for h in history]
        points = [(s, max(p, 1e-6)) for s, p in points if p is not None]
        if points:
            tests.plot(*zip(*points, strict=True), "o-", label=label)
    if threshold:
        tests.axhline(threshold, color="red", linestyle="--", label="threshold")
    tests.set(yscale="log", xlabel="check", ylabel="p-value", title="Drift tests")
    tests.legend(fontsize=8)
    volume.bar(steps, [h["check"].get("requests", 0) for h in history])
    volume.set(xlabel="check", ylabel="requests", title="Logged requests per check")
    live = [h for h in history if h.get("feedback", {}).get("labelled")]
    if live:
        xs = [h["step"] for h in live]
        ys = [h["feedback"]["accuracy"] for h in live]
        low = [y - h["feedback"]["accuracy_low"] for y, h in zip(ys, live, strict=True)]
        high = [h["feedback"]["accuracy_high"] - y for y, h in zip(ys, live, strict=True)]
        accuracy.errorbar(xs, ys, yerr=[low, high], fmt="o", capsize=3, label="live (95 %)")
        champion = [h["feedback"].get("champion_test_accuracy") for h in live]
        if champion[-1] is not None:
            accuracy.axhline(champion[-1], color="green", linestyle="--", label="champion (test)")
        accuracy.legend(fontsize=8)
    accuracy.set(xlabel="check", ylabel="accuracy", title="Labelled feedback")
    fig.tight_layout()
    return _png(fig)


def traffic_figure(reference: Reference, check: Mapping[str, Any], probs: np.ndarray) -> str:
    """Reference and traffic on the first two principal components, their predicted classes
    and their top-1 confidence."""
    plt = _pyplot()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 3.8))
    left.scatter(*reference.embeddings[:, :2].T, s=8, alpha=0.5, label="reference (validation)")
    left.scatter(*check["embeddings"][:, :2].T, s=8, alpha=0.5, label="served traffic")
    left.set(xlabel="PC 1", ylabel="PC 2", title=f"Embeddings (MMD p = {check['embedding_p']:.3g})")
    left.legend(fontsize=8)
    names = list(check["predicted"])
    total = max(1, sum(check["predicted"].values()))
    ref_total = max(1, sum(check["reference_predicted"].values()))
    positions = np.arange(len(names))
    middle.bar(
        positions - 0.2,
        [check["reference_predicted"][n] / ref_total for n in names],
        0.4,
        label="reference",
    )
    middle.bar(positions + 0.2, [check["predicted"][n] / total for n in names], 0.4, label="served")
    middle.set_xticks(positions, names, rotation=30, ha="right")
    middle.set(ylabel="fraction", title=f"Predicted classes (p = {check['class_p']:.3g})")
    middle.legend(fontsize=8)
    bins = np.linspace(0.0, 1.0, 21)
    right.hist(
        reference.probabilities.max(axis=1), bins, density=True, alpha=0.5, label="reference"
    )
    right.hist(probs.max(axis=1), bins, density=True, alpha=0.5, label="served")
    right.set(xlabel="top-1 confidence", ylabel="density")
    right.set_title(f"Confidence (KS p = {check['confidence_p']:.3g})")
    right.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def farthest(
    reference: Reference, embeddings: np.ndarray, count: int = FARTHEST
) -> list[tuple[int, float]]:
    """The ``count`` logged images whose embedding is farthest from every reference image's
    (the distance to the nearest one), farthest first: (index, distance)."""
    if not len(embeddings):
        return []
    gaps = np.sqrt(
        ((embeddings[:, None, :] - reference.embeddings[None, :, :]) ** 2).sum(axis=2)
    ).min(axis=1)
    order = np.argsort(-gaps)[:count]
    return [(int(i), float(gaps[i])) for i in order]


def _thumbnail(encoded: bytes, side: int = 120) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(encoded)) as image:
            image.thumbnail((side, side))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, "PNG")
    except Exception:  # a logged image the browser cannot show: say so in its cell
        return ""
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _rows(items: Mapping[str, Any]) -> str:
    return "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in items.items()
    )


def _list(title: str, lines: Sequence[str]) -> str:
    if not lines:
        return ""
    items = "".join(f"<li>{html.escape(str(line))}</li>" for line in lines)
    return f"<h2>{html.escape(title)} ({len(lines)})</h2><ul>{items}</ul>"


STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:80em}"
    "th{text-align:left;padding-right:1em;font-weight:normal;color:#555}"
    ".banner{padding:1em 1.5em;border-radius:6px;margin-bottom:1em}"
    ".alarm{background:#fde2e1;border-left:8px solid #c62828}"
    ".wait{background:#fff4d6;border-left:8px solid #e0a100}"
    ".ok{background:#e3f4e4;border-left:8px solid #2e7d32}"
    ".grid{display:flex;flex-wrap:wrap;gap:1em}"
    ".grid figure{margin:0;width:130px;font-size:0.8em}"
    "img.plot{max-width:100%}"
)


def render(
    title: str,
    reference: Reference,
    check: Mapping[str, Any],
    feedback: Mapping[str, Any],
    reasons: Sequence[str],
    retraining: Mapping[str, Any] | None,
    history: Sequence[Mapping[str, Any]],
    encoded: Sequence[bytes],
    probs: np.ndarray,
) -> str:
    """The page (see the module): ``check`` and ``feedback`` as imgpipe.monitoring.traffic returns
    them, ``retraining`` what was started (None: nothing), ``history`` this version's checks
    so far as their summary.json (this one last), ``encoded`` and ``probs`` the compared
    sample of logged images and their answers."""
    level, headline, todo = verdict(check, reasons, retraining)
    banner = (
        f'<div class="banner {level}" id="verdict"><h2>{html.escape(headline)}</h2>'
        + (f"<p><b>Started:</b> {html.escape(started_text(retraining))}</p>" if retraining else "")
        + "<p><b>What to do:</b></p><ul>"
        + "".join(f"<li>{html.escape(t)}</li>" for t in todo)
        + "</ul></div>"
    )
    figures = {
        "checked at": iso(history[-1].get("checked_at")) if history else "",
        "requests logged since the last check": check.get("requests", 0),
        "compared (a uniform sample)": check.get("compared", 0),
        "first request": iso(check.get("first_time")),
        "last request": iso(check.get("last_time")),
        "log files read": check.get("files", 0),
        "answered by other models or versions": ", ".join(
            f"{k}: {v}" for k, v in check.get("other_versions", {}).items()
        )
        or "none",
        "per-test threshold (false-alarm rate / 3 tests)": check.get("test_p_value", ""),
    }
    for key, label in (
        ("embedding_p", "embedding MMD p-value"),
        ("class_p", "predicted classes p-value"),
        ("confidence_p", "confidence p-value"),
        ("mean_confidence", "mean top-1 confidence (served)"),
        ("reference_mean_confidence", "mean top-1 confidence (reference)"),
    ):
        if key in check:
            figures[label] = f"{check[key]:.4g}"
    if feedback.get("labelled"):
        figures["live accuracy (labelled feedback)"] = (
            f"{feedback['accuracy']:.4f} [{feedback['accuracy_low']:.4f}, "
            f"{feedback['accuracy_high']:.4f}] on {feedback['labelled']} images"
        )
        if feedback.get("champion_test_accuracy") is not None:
            figures["champion's test accuracy"] = f"{feedback['champion_test_accuracy']:.4f}"
    for key in ("feedback_appended", "feedback_skipped", "feedback_for_review"):
        if key in feedback and not isinstance(feedback[key], list):
            figures[key.replace("_", " ")] = feedback[key]
    parts = [banner, f"<table>{_rows(figures)}</table>"]
    trend = trend_figure(history, check.get("test_p_value"))
    if trend:
        parts.append(f'<h2>Across checks</h2><img class="plot" alt="trend" src="{trend}">')
    if check.get("enough") and "embeddings" in check:
        plot = traffic_figure(reference, check, probs)
        parts.append(
            f'<h2>Served traffic against the reference</h2><img class="plot" alt="traffic" '
            f'src="{plot}">'
        )
        names = list(check["predicted"])
        cells = []
        for index, gap in farthest(reference, check["embeddings"]):
            best = int(np.argmax(probs[index]))
            thumbnail = _thumbnail(encoded[index])
            picture = f'<img alt="logged image" src="{thumbnail}">' if thumbnail else "(no preview)"
            cells.append(
                f"<figure>{picture}<figcaption>{html.escape(names[best])} "
                f"({probs[index][best]:.2f}); distance {gap:.2f}</figcaption></figure>"
            )
        parts.append(
            "<h2>Logged images farthest from the reference</h2>"
            f'<div class="grid" id="farthest">{"".join(cells)}</div>'
        )
    parts.append(_list("Input checks that failed", check.get("input_failures", [])))
    parts.append(
        _list(
            "Log files quarantined (read up to their bad record, never again)",
            [f"{k}: {v}" for k, v in check.get("quarantined_files", {}).items()],
        )
    )
    parts.append(
        _list(
            "Feedback held for review (the same image is in the data under another label)",
            feedback.get("feedback_for_review", []),
        )
    )
    parts.append(_list("Feedback not appended", feedback.get("feedback_skipped_files", [])))
    if retraining and retraining.get("commands"):
        parts.append(_list("Retraining commands", retraining["commands"]))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        + "".join(parts)
        + "</body></html>"
    )


def started_text(retraining: Mapping[str, Any]) -> str:
    how = retraining.get("how", "")
    if how in ("none", "commands") or retraining.get("commands"):
        return "nothing (--retrain none): the commands are listed below"
    bits = [f"a retraining by {how}"]
    if retraining.get("feedback_images"):
        bits.append(f"with {retraining['feedback_images']} feedback images appended")
    if retraining.get("run"):
        bits.append(f"run {retraining['run']}")
    if retraining.get("registered_version"):
        blessed = "blessed, serving" if retraining.get("blessed") else "not blessed"
        bits.append(f"registered as version {retraining['registered_version']} ({blessed})")
    if retraining.get("failed"):
        bits.append(f"failed at: {retraining['failed']}")
    return ", ".join(bits)
