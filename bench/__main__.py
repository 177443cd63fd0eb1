"""Every benchmark in one go (``make bench``): each runs in its own process, writes its JSON to
``bench/results/<name>.json``, and the figures are gathered into ``bench/results/summary.md``
(and ``summary.json``). Needs the outputs of ``make demo``.

    python -m bench [--only serving,training] [--results bench/results]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.machine import describe

BENCHMARKS: dict[str, list[str]] = {
    # demo_stages first: it reads the MLflow runs of `make demo`, before anything else runs
    "demo_stages": [],
    "dvc_overhead": ["--repeats", "3"],
    "training": ["--images", "512", "--steps", "8", "--repeats", "3"],
    "distributed": ["--steps", "12"],
    "frozen_cache": ["--images", "512", "--val-images", "128", "--epochs", "3", "--repeats", "3"],
    "serving": ["--clients", "1,8,32", "--requests", "200", "--repeats", "3"],
    "ingest_scale": ["--images", "50000", "--small", "5000"],
    "drift": ["--repeats", "20", "--requests", "200", "--shift-repeats", "3"],
    "faults": [],
}


def run(name: str, results: Path) -> tuple[dict[str, Any], float]:
    """One benchmark in its own process (clean memory, no shared TensorFlow state); its
    output goes to ``<name>.log`` beside its JSON."""
    out, log = results / f"{name}.json", results / f"{name}.log"
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        code = subprocess.call(
            [sys.executable, "-m", f"bench.{name}", *BENCHMARKS[name], "--out", str(out)],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    seconds = time.perf_counter() - started
    if code:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise SystemExit(f"bench {name} failed (exit {code}); the end of {log}:\n{tail}")
    return json.loads(out.read_text()), seconds


def _table(header: tuple[str, ...], *rows: tuple[Any, ...]) -> list[str]:
    """A markdown table's lines."""
    return [_row(*header), _row(*["---"] * len(header)), *(_row(*row) for row in rows)]


def _row(*cells: Any) -> str:
    return "| " + " | ".join("" if c is None else str(c) for c in cells) + " |"


def summary(reports: dict[str, dict[str, Any]], seconds: dict[str, float]) -> str:
    machine = describe()
    lines = [
        "# imgpipe benchmarks",
        "",
        f"Machine: {machine['cpu_model']}, {machine['cores']} cores; Python "
        f"{machine['python']}; {time.strftime('%Y-%m-%d %H:%M')}. Every figure is the median "
        "of the repeated runs each section names; ratios come from one run, side by side.",
    ]
    if "frozen_cache" in reports:
        r = reports["frozen_cache"]
        m = r["median_seconds"]
        lines += [
            "",
            f"## Frozen phase: feature cache against `fit` through the frozen base "
            f"({r['images']} images, {r['epochs']} epochs, median of {r['repeats']})",
            "",
            *_table(
                ("cached features (s)", "plain fit (s)", "speedup", "one forward pass (s)",
                 "cached / forward pass"),
                (m["cached"], m["plain_fit"], f"{r['speedup_cached_over_plain_fit']}x",
                 m["forward_pass"], r["cached_over_forward_pass"]),
            ),
            "",
            "The floor for the cached phase is one bare forward pass of the base over the same "
            "images, through a function traced beforehand (the features must be computed once); "
            "what the cached phase adds is tracing its own function and training the head "
            "(per-round times in the JSON).",
        ]  # fmt: skip
    if "training" in reports:
        r = reports["training"]
        m = r["median_images_per_second"]
        lines += [
            "",
            f"## Input pipeline against the fine-tuning step (batch {r['batch_size']}, "
            f"{r['trainable_base_layers']} base layers trainable, median of {r['repeats']})",
            "",
            *_table(
                ("tf.data pipeline alone (img/s)", "train step (img/s)", "pipeline / step",
                 "whole fine-tuning epochs in `make demo` (img/s)"),
                (m["pipeline"], m["train_step"], f"{r['pipeline_over_train_step']}x",
                 r["finetune_fit_images_per_second"]),
            ),
        ]  # fmt: skip
    if "distributed" in reports:
        r = reports["distributed"]
        runs, ratio = r["runs"], r["ratio_to_one_device"]
        lines += [
            "",
            f"## Fine-tuning spread over replicas and workers (CPU proxy; {r['steps']} timed "
            "steps each, one run)",
            "",
            *_table(
                ("run", "replicas", "img/s", "/ one device"),
                *((name, v["replicas"], round(v["images_per_second"], 1), f"{ratio[name]}x")
                  for name, v in runs.items()),
            ),
            "",
            "Two replicas are two logical devices of one CPU (MirroredStrategy), two workers two "
            "processes on 127.0.0.1 (MultiWorkerMirroredStrategy); both share this machine's "
            "cores, so the ratios show the strategies' cost, not a GPU or node speedup.",
        ]  # fmt: skip
    if "demo_stages" in reports:
        r = reports["demo_stages"]
        lines += [
            "",
            f"## `make demo` by stage (MLflow, median of {r['runs']} whole-pipeline run(s))",
            "",
            *_table(
                ("stage", "wall time (s)", "peak RSS (MiB)"),
                *((stage, v["wall_seconds"], v["peak_rss_mb"]) for stage, v in r["stages"].items()),
                ("**total**", r["total_wall_seconds"], ""),
            ),
        ]
    if "serving" in reports:
        r = reports["serving"]
        sizes = r["request_bytes"]
        lines += [
            "",
            f"## Serving ({r['model']}; {r['requests_per_setting']} single-image requests per "
            f"setting, median of {r['repeats']} rounds; clients and server share the machine)",
            "",
            *_table(
                ("setting", "p50 ms", "p99 ms", "img/s"),
                *(
                    (key, v["p50_ms"], v["p99_ms"], v["images_per_second"])
                    for key, v in r["results"].items()
                ),
            ),
            "",
            f"Request size: {sizes['bytes']:,} B for the encoded image (bytes signature), "
            f"{sizes['uint8_tensor']:,} B as a uint8 tensor, {sizes['float32_tensor']:,} B as a "
            "float32 tensor (size only: the model's tensor signature takes uint8).",
            "",
            f"Logging sidecar in front of the unbatched server (sampling 1.0): p50 "
            f"+{r['sidecar_overhead_p50_ms']} ms over the direct call, side by side "
            f"(`logged_sidecar/1` against `logged_unbatched/1`); {r['failed_requests']} failed "
            f"requests in the whole run; {r['sidecar_logged_records']:,} of "
            f"{r['sidecar_answered_requests']:,} answered calls logged.",
        ]
    if "faults" in reports:
        r = reports["faults"]
        lines += [
            "",
            f"## Hostile input and failure ({r['saved_model']})",
            "",
            f"{r['as_expected']} of {r['cases']} cases ended as expected; "
            f"{r['files_outside']} files written outside their folders.",
            "",
            *_table(
                ("case", "outcome", "process up", "records lost (bound)", "peak RSS MB"),
                *(
                    (
                        row["case"],
                        row["outcome"].splitlines()[0][:120],
                        {True: "yes", False: "killed", None: ""}[row["process_up"]],
                        ""
                        if row["records_lost"] is None
                        else f"{row['records_lost']} ({row['records_lost_bound']})",
                        f"{row['peak_rss_mb']:.0f}",
                    )
                    for row in r["rows"]
                ),
            ),
        ]
    if "drift" in reports:
        r = reports["drift"]
        null = r["no_shift"]
        lines += [
            "",
            f"## Drift detection on served traffic ({r['model']}; {r['requests_per_draw']} "
            "requests per draw through the logging sidecar, `imgpipe monitor`'s checks at "
            "params.yaml's thresholds)",
            "",
            f"No shift (test images): {null['alarms']} alarms in {null['repeats']} draws, "
            f"false-alarm rate {null['false_alarm_rate']:.2f} (checks that fired: "
            f"{null['fired']}).",
            "",
            *_table(
                ("shift", "strength: draws flagged", "smallest flagged in every draw"),
                *((kind, ", ".join(f"{v['level']:g}: {v['detected']}" for v in levels),
                   r["smallest_detected"][kind]) for kind, levels in r["shifts"].items()),
            ),
            "",
            f"{r['failed_requests']} failed requests; {r['logged_requests']:,} of "
            f"{r['sent_requests']:,} logged.",
        ]  # fmt: skip
    if "ingest_scale" in reports:
        r = reports["ingest_scale"]
        rate, rss = r["images_per_second"], r["peak_rss_mb"]
        lines += [
            "",
            f"## Ingest scaling ({r['images']:,} generated {r['image_side']}x{r['image_side']} "
            "PNGs; one run each, every ingest in a fresh process)",
            "",
            *_table(
                ("1 worker (img/s)", "2 workers (img/s)", "2 / 1"),
                (rate["1"], rate["2"], f"{r['speedup_2_over_1_worker']}x"),
            ),
            "",
            *_table(
                (f"peak RSS, {r['small_images']:,} images (MiB)",
                 f"peak RSS, {r['images']:,} images (MiB)", "large / small",
                 f"within {r['memory_bound']}x"),
                (rss["small"], rss["large"], r["peak_rss_large_over_small"],
                 "yes" if r["memory_flat"] else "**NO**"),
            ),
            "",
            "Peak RSS: the largest of the ingest process and its child processes (2 workers). "
            f"Generating the images took {r['generation_seconds']} s (0 when cached).",
        ]  # fmt: skip
    if "dvc_overhead" in reports:
        r = reports["dvc_overhead"]
        lines += [
            "",
            "## Pipeline overhead (DVC)",
            "",
            f"- No-op `dvc repro`: {r['median_noop_repro_seconds']} s "
            f"(median of {r['repeats']}).",
            f"- Changing `{r['changed_param']}` invalidates {', '.join(r['stages_invalidated'])}"
            f" (`dvc status`); a repro then runs {', '.join(r['stages_rerun'])} "
            f"({'' if r['only_finetune_and_after'] else 'NOT '}only finetune and after).",
        ]  # fmt: skip
    lines += [
        "",
        "Benchmark wall times: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
        + f"; total {sum(seconds.values()):.0f} s.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated names")
    parser.add_argument("--results", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    names = args.only.split(",")
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; known: {list(BENCHMARKS)}")

    args.results.mkdir(parents=True, exist_ok=True)
    reports, seconds = {}, {}
    for name in names:
        print(f"bench: {name} ...", flush=True)
        reports[name], seconds[name] = run(name, args.results)
        print(f"bench: {name} done in {seconds[name]:.0f} s", flush=True)
    text = summary(reports, seconds)
    (args.results / "summary.md").write_text(text)
    (args.results / "summary.json").write_text(
        json.dumps({"machine": describe(), "seconds": seconds, "reports": reports}, indent=2) + "\n"
    )
    print(text)
    print(f"-> {args.results / 'summary.md'}, {args.results / 'summary.json'}")


if __name__ == "__main__":
    main()
