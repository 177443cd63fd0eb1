"""The growing-data scenario, run for real through an orchestrator: what a scheduled pipeline
meets as its data grows, and what the split, the lineage and the gate do about it.

- v1: the source's images less a held-back share -> the first model, blessed on the floors
  alone, becomes the champion;
- v2: v1 plus the held-back images (``new_fraction`` of v1) -> how many of v1's images changed
  split (at most ``2k + 3`` per class for ``k`` new images of the class, ``imgpipe.data.splits``);
  the champion is re-scored on the test images it never trained on, and the gate decides;
- v3: v2 with ``corrupt_fraction`` of one class's images moved into another class folder (a
  labelling gone wrong) -> the candidate is refused.

Each version is a folder of class folders under ``work`` (copies: the source is never
modified), run by DVC (a throwaway git + DVC project: ``dvc add data``, ``dvc repro``) or by
kfp.local (``run_local`` with the version as the pipeline's source). Metadata CSVs are not
carried over, so stratification is by label only and slicing is off. The claims above are
checked against what the stages wrote, independently of them (the manifests of two versions
compared by sha256), and a failed claim is an error.

>>> growing.run(Path("data"), Path("/tmp/growing"), orchestrator="dvc", params=params)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from imgpipe.core.errors import InputError
from imgpipe.core.fileio import write_json_atomic
from imgpipe.data.manifest import read_manifest

log = logging.getLogger(__name__)

PROJECT = Path(__file__).resolve().parents[1]
CODE = ("components", "imgpipe", "pipelines", "serving")
"""The packages a DVC stage's code deps live in, copied into the scenario's project."""
EXPERIMENT = "imgpipe-growing"
VERSIONS = ("v1", "v2", "v3")

Orchestrator = Literal["dvc", "kfp"]


class ScenarioError(InputError):
    """A claim of the scenario did not hold, or it cannot run on this source."""


def _classes(source: Path) -> dict[str, list[Path]]:
    if not source.is_dir():
        raise ScenarioError(f"{source}: not a folder of class folders")
    classes = {
        d.name: sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
        for d in sorted(source.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    }
    predefined = sorted(set(classes) & {"train", "val", "validation", "test"})
    if predefined:
        raise ScenarioError(
            f"{source}: has split folders {predefined}; the scenario draws its own split and "
            "takes a folder of class folders"
        )
    classes = {name: files for name, files in classes.items() if files}
    if len(classes) < 2:
        raise ScenarioError(f"{source}: needs at least two class folders with images in them")
    return classes


def make_versions(
    source: Path,
    work: Path,
    *,
    new_fraction: float,
    corrupt_fraction: float,
    seed: int,
    corrupt_class: str | None = None,
    corrupt_to: str | None = None,
) -> dict[str, Any]:
    """Write ``work/data_v1``, ``data_v2`` and ``data_v3`` (see the module) from ``source``'s
    class folders; return what was held back and relabelled."""
    if not 0 < new_fraction <= 1 or not 0 < corrupt_fraction <= 1:
        raise ScenarioError("new_fraction and corrupt_fraction must be in (0, 1]")
    classes = _classes(source)
    rng = np.random.default_rng(seed)
    held_back: dict[str, set[Path]] = {}
    for name, files in classes.items():
        count = round(len(files) * new_fraction / (1 + new_fraction))
        held_back[name] = {files[i] for i in rng.choice(len(files), count, replace=False)}
    by_size = sorted(classes, key=lambda c: (-len(classes[c]), c))
    corrupt_class = corrupt_class or by_size[0]
    corrupt_to = corrupt_to or next(c for c in by_size if c != corrupt_class)
    for name in (corrupt_class, corrupt_to):
        if name not in classes:
            raise ScenarioError(f"{source}: no class folder {name!r}; it has {sorted(classes)}")
    victims = classes[corrupt_class]
    flipped = {
        victims[i]
        for i in rng.choice(len(victims), round(len(victims) * corrupt_fraction), replace=False)
    }
    for version in VERSIONS:
        folder = work / f"data_{version}"
        if folder.exists():
            shutil.rmtree(folder)
        for name, files in classes.items():
            for path in files:
                if version == "v1" and path in held_back[name]:
                    continue
                label = corrupt_to if version == "v3" and path in flipped else name
                target = (
                    folder / label / (path.name if label == name else f"from_{name}_{path.name}")
                )
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    return {
        "source": str(source),
        "images": {name: len(files) for name, files in classes.items()},
        "new_in_v2": {name: len(files) for name, files in held_back.items()},
        "relabelled_in_v3": {"from": corrupt_class, "to": corrupt_to, "images": len(flipped)},
    }


def _manifest(path: Path) -> dict[str, dict[str, str]]:
    return {row["sha256"]: row for row in read_manifest(path)}


def split_moves(before: Mapping[str, dict], after: Mapping[str, dict]) -> dict[str, Any]:
    """How many images of both manifests, under the same label, changed split, per class;
    against the bound ``2k + 3`` per class for ``k`` images added to or removed from it (an
    image relabelled from a to b is removed from a and added to b: its own split may move)."""

    def keys(rows: Mapping[str, dict]) -> set[tuple[str, str]]:
        return {(digest, row["label"]) for digest, row in rows.items()}

    old, new = keys(before), keys(after)
    moved = Counter(
        label for digest, label in old & new if before[digest]["split"] != after[digest]["split"]
    )
    added, removed = Counter(c for _, c in new - old), Counter(c for _, c in old - new)
    labels = sorted({label for _, label in new})
    bound = {c: 2 * (added[c] + removed[c]) + 3 for c in labels}
    return {
        "images": sum(moved.values()),
        "bound": sum(bound.values()),
        "by_class": {c: {"moved": moved[c], "bound": bound[c]} for c in labels},
        "added": sum(added.values()),
        "removed": sum(removed.values()),
    }


def _record(manifest: Path, blessing: Path, previous: dict[str, Any] | None) -> dict[str, Any]:
    rows = _manifest(manifest)
    decision = json.loads(blessing.read_text())
    record: dict[str, Any] = {
        "images": len(rows),
        "splits": dict(sorted(Counter(r["split"] for r in rows.values()).items())),
        "blessed": decision["blessed"],
        "reasons": [c["reason"] for c in decision["checks"]],
        "failed": [c["check"] for c in decision["checks"] if not c["passed"]],
        "test": decision["candidate"],
        "champion": decision["champion"],
        "comparison": decision["comparison"],
    }
    if previous is not None:
        before = previous["rows"]
        record["moved"] = split_moves(before, rows)
        old_training = {d for d, r in before.items() if r["split"] in ("train", "val")}
        test = {d for d, r in rows.items() if r["split"] == "test"}
        record["test_images_the_champion_trained_on"] = len(test & old_training)
    return {**record, "rows": rows}


def check(records: Mapping[str, dict[str, Any]]) -> list[str]:
    """The scenario's claims, each as a sentence; raises ScenarioError on the first that fails."""
    v1, v2, v3 = (records[v] for v in VERSIONS)
    said = []
    if not v1["blessed"]:
        raise ScenarioError(
            "v1 was not blessed, so there is no champion to grow from: "
            + "; ".join(v1["reasons"])
            + " (lower the floors with -S evaluate.min_accuracy=... for a quick recipe)"
        )
    said.append(f"v1 became the champion: {'; '.join(v1['reasons'])}")
    moved = v2["moved"]
    if moved["images"] > moved["bound"]:
        raise ScenarioError(f"v2 moved {moved['images']} old images, beyond the bound: {moved}")
    said.append(
        f"v2 added {moved['added']} images; {moved['images']} of v1's images changed split "
        f"(bound {moved['bound']})"
    )
    champion = v2["champion"]
    if champion is None or champion["version"] != 1:
        raise ScenarioError(f"v2 was not compared with champion v1: {champion}")
    expected = v2["test_images_the_champion_trained_on"]
    if champion["excluded"] != expected or not champion["lineage"]:
        raise ScenarioError(
            f"v2's test split holds {expected} images the champion trained on, evaluate "
            f"excluded {champion['excluded']}"
        )
    said.append(
        f"v2 compared with champion v1 on {champion['images']} test images, {expected} "
        f"excluded as its training images; {'blessed' if v2['blessed'] else 'NOT blessed'}: "
        + "; ".join(v2["reasons"])
    )
    if v3["blessed"] or "labels_kept" not in v3["failed"]:
        raise ScenarioError(f"v3 (corrupted labels) was not refused for them: {v3['reasons']}")
    said.append(f"v3 refused: {'; '.join(v3['reasons'])}")
    return said


def dvc_env(work: Path, experiment: str = EXPERIMENT) -> dict[str, str]:
    """The environment of a throwaway DVC project under ``work``: this venv's commands first,
    DVC's and git's configuration and MLflow's store inside ``work``, no analytics."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "GIT_"))}
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "DVC_NO_ANALYTICS": "1",
            "DVC_SITE_CACHE_DIR": str(work / "dvc-site-cache"),
            "DVC_GLOBAL_CONFIG_DIR": str(work / "dvc-global-config"),
            "DVC_SYSTEM_CONFIG_DIR": str(work / "dvc-system-config"),
            "GX_ANALYTICS_ENABLED": "false",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
            "MLFLOW_EXPERIMENT_NAME": experiment,
            "GIT_AUTHOR_NAME": "imgpipe",
            "GIT_AUTHOR_EMAIL": "imgpipe@example.invalid",
            "GIT_COMMITTER_NAME": "imgpipe",
            "GIT_COMMITTER_EMAIL": "imgpipe@example.invalid",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
        }
    )
    return env


def _sh(args: list[str], cwd: Path, env: dict[str, str], log_file: Path | None = None) -> None:
    if log_file is None:
        result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
        output = result.stdout + result.stderr
    else:
        with open(log_file, "a", encoding="utf-8") as f:
            result = subprocess.run(
                args, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True
            )
        output = f"see {log_file}"
    if result.returncode:
        raise ScenarioError(f"{' '.join(args)} exited {result.returncode} in {cwd}: {output}")


def dvc_project(root: Path, params: dict[str, Any], env: dict[str, str]) -> None:
    """A git + DVC project in ``root`` with this project's dvc.yaml, its stages' code and
    ``params``; ``data/`` is added per version."""
    if not (PROJECT / "dvc.yaml").is_file():
        raise ScenarioError(f"the DVC scenario needs the project's checkout; no {PROJECT}/dvc.yaml")
    root.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(PROJECT / name, root / name)
    for package in CODE:
        shutil.copytree(
            PROJECT / package, root / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    (root / ".gitignore").write_text("/mlartifacts/\n/models/\n__pycache__/\n")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _sh(["git", "init", "-q"], root, env)
    _sh(["dvc", "init", "-q"], root, env)


def _run_dvc(
    work: Path, params: dict[str, Any], env: dict[str, str]
) -> dict[str, tuple[Path, Path, float]]:
    root = work / "dvc"
    dvc_project(root, params, env)
    outputs = {}
    for version in VERSIONS:
        started = time.perf_counter()
        shutil.rmtree(root / "data", ignore_errors=True)
        shutil.copytree(work / f"data_{version}", root / "data")
        logs = work / f"dvc_{version}.log"
        _sh(["dvc", "add", "-q", "data"], root, env)
        _sh(["git", "add", "-A"], root, env)
        _sh(["git", "commit", "-q", "-m", f"data {version}"], root, env)
        log.info("growing: dvc repro on data %s (log: %s)", version, logs)
        _sh(["dvc", "repro"], root, env, logs)
        staged = work / "outputs" / version
        staged.mkdir(parents=True)
        shutil.copy(root / "outputs" / "ingest" / "manifest.csv", staged / "manifest.csv")
        shutil.copy(root / "outputs" / "evaluate" / "blessing.json", staged / "blessing.json")
        outputs[version] = (
            staged / "manifest.csv",
            staged / "blessing.json",
            time.perf_counter() - started,
        )
    return outputs


def _run_kfp(
    work: Path, params: dict[str, Any], env: dict[str, str]
) -> dict[str, tuple[Path, Path, float]]:
    from pipelines.kubeflow import run_local

    outputs = {}
    for version in VERSIONS:
        started = time.perf_counter()
        root = work / "kfp" / version
        log.info("growing: kfp.local on data %s (pipeline root %s)", version, root)
        run_local(
            params,
            root,
            source=str(work / f"data_{version}"),
            data_version=version,
            mlflow_tracking_uri=env["MLFLOW_TRACKING_URI"],
            shared_volume=str(work / "kfp" / "shared"),
        )
        (run_dir,) = root.iterdir()
        outputs[version] = (
            run_dir / "ingest" / "out" / "manifest.csv",
            run_dir / "evaluate" / "out" / "blessing.json",
            time.perf_counter() - started,
        )
    return outputs


def run(
    source: Path,
    work: Path,
    *,
    orchestrator: Orchestrator,
    params: dict[str, Any],
    new_fraction: float = 0.1,
    corrupt_fraction: float = 0.25,
    seed: int = 0,
    out: Path | None = None,
) -> dict[str, Any]:
    """Run the scenario in ``work`` (a new folder) and check its claims; write the report to
    ``out`` (JSON) when given, also when a claim fails."""
    source, work = source.resolve(), work.resolve()
    if work.exists() and any(work.iterdir()):
        raise ScenarioError(f"{work}: the scenario's work folder must be new or empty")
    work.mkdir(parents=True, exist_ok=True)
    params = {k: dict(v) if isinstance(v, dict) else v for k, v in params.items()}
    params["data"].update(source="data", metadata_csv=None)
    params["ingest"].update(stratify_by=["label"], group_by=None, split_mode="random")
    params["evaluate"].update(slice_by=[], class_groups={})
    params["validate"].update(labels=[])
    data = make_versions(
        source, work, new_fraction=new_fraction, corrupt_fraction=corrupt_fraction, seed=seed
    )
    env = dvc_env(work)
    ran = (_run_dvc if orchestrator == "dvc" else _run_kfp)(work, params, env)
    records: dict[str, dict[str, Any]] = {}
    previous = None
    for version in VERSIONS:
        manifest, blessing, seconds = ran[version]
        previous = records[version] = {
            **_record(manifest, blessing, previous),
            "seconds": round(seconds),
        }
    report: dict[str, Any] = {
        "orchestrator": orchestrator,
        "data": data,
        "versions": {v: {k: x for k, x in r.items() if k != "rows"} for v, r in records.items()},
    }
    try:
        report["claims"] = check(records)
    finally:
        if out is not None:
            write_json_atomic(out, report)
    return report
