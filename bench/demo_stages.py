"""``make demo`` by stage: each stage's wall time and peak resident memory, as the stages
themselves logged them to MLflow (``<stage>.wall_seconds``, ``<stage>.peak_rss_mb``), over every
run in which the whole pipeline ran; medians across those runs.

    python -m bench.demo_stages

Reads the tracking store the pipeline wrote (``MLFLOW_TRACKING_URI``, else ``mlflow.db``).
Writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

from bench.machine import describe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default=None, help="default: the pipeline's")
    parser.add_argument("--out", type=Path, default=Path("bench/results/demo_stages.json"))
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from imgpipe.tracking.runs import DEFAULT_EXPERIMENT, tracking_uri

    stages = list(yaml.safe_load(Path("dvc.yaml").read_text())["stages"])
    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name(args.experiment or DEFAULT_EXPERIMENT)
    if experiment is None:
        raise SystemExit(f"no MLflow experiment at {tracking_uri()}: run `make demo` first")
    whole = [
        run
        for run in client.search_runs([experiment.experiment_id], max_results=1000)
        if all(run.data.tags.get(f"stage.{s}") == "done" for s in stages)
    ]
    if not whole:
        raise SystemExit("no MLflow run in which every stage ran: run `make demo` first")

    def median(stage: str, metric: str) -> float | None:
        values = [r.data.metrics.get(f"{stage}.{metric}") for r in whole]
        present = [v for v in values if v is not None]
        return round(statistics.median(present), 1) if present else None

    by_stage = {
        s: {"wall_seconds": median(s, "wall_seconds"), "peak_rss_mb": median(s, "peak_rss_mb")}
        for s in stages
    }
    report = {
        "benchmark": "demo_stages",
        "machine": describe(),
        "runs": len(whole),
        "run_ids": [r.info.run_id for r in whole],
        "stages": by_stage,
        "total_wall_seconds": round(sum(v["wall_seconds"] or 0 for v in by_stage.values()), 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
