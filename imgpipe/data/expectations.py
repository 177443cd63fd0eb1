"""Great Expectations suites over pandas frames, the one way validate (the ingest manifest) and
``imgpipe monitor`` (the logged requests' images) run them: an ephemeral context, one suite and
checkpoint per batch, Data Docs written to a folder, every outcome as a plain dict.

    outcomes = run_suites({"manifest": (frame, expectations, ["filepath"])}, docs, "ingest")
    failed = [describe_outcome(o) for o in outcomes if not o["success"]]
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

MAX_ROWS_IN_MESSAGE = 10


def run_suites(
    batches: dict[str, tuple[pd.DataFrame, list[Any], list[str]]], docs: Path, source: str
) -> list[dict[str, Any]]:
    """Run each batch (name: frame, expectations, the columns that name a row) through its own
    suite; Data Docs go to ``docs``. The outcomes of every expectation, in order."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.add_data_docs_site(
        "imgpipe",
        {
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs.resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    data_source = context.data_sources.add_pandas(source)
    outcomes: list[dict[str, Any]] = []
    for name, (frame, expectations, id_columns) in batches.items():
        definition = data_source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(
            name
        )
        suite = context.suites.add(gx.ExpectationSuite(name=f"imgpipe_{name}"))
        for expectation in expectations:
            suite.add_expectation(expectation)
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"validate_{name}", data=definition, suite=suite)
        )
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"checkpoint_{name}",
                validation_definitions=[validation],
                actions=[
                    gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["imgpipe"])
                ],
                result_format={
                    "result_format": "COMPLETE",
                    "unexpected_index_column_names": id_columns,
                },
            )
        )
        with _quiet_renderer():
            result = checkpoint.run(batch_parameters={"dataframe": frame})
        for run_result in result.run_results.values():
            outcomes += [_outcome(name, r) for r in run_result.results]
    return outcomes


RENDERER_LOGGER = (
    "great_expectations.render.renderer.content_block.validation_results_table_content_block"
)


class _RendererTraceback(logging.Filter):
    """Great Expectations 1.x logs an ERROR with a traceback when its Data Docs renderer cannot
    word the "unexpected" sentence of an aggregate expectation (distinct values: KeyError
    'unexpected_percent'); the page renders without that sentence, and the failure itself is
    what validate reports. That one message goes to DEBUG; anything else passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "'unexpected_percent'" in record.getMessage():
            logging.getLogger(__name__).debug("Data Docs: %s", record.getMessage()[:200])
            return False
        return True


@contextlib.contextmanager
def _quiet_renderer() -> Iterator[None]:
    logger, noise = logging.getLogger(RENDERER_LOGGER), _RendererTraceback()
    logger.addFilter(noise)
    try:
        yield
    finally:
        logger.removeFilter(noise)


def _offending(result: Any) -> list[str]:
    rows = result.result.get("unexpected_index_list") or []
    keys = [
        next((str(r[k]) for k in ("filepath", "key") if k in r), str(r))
        if isinstance(r, dict)
        else str(r)
        for r in rows
    ]
    if not keys:  # aggregate expectations (e.g. distinct values) list values, not rows
        unexpected = result.result.get("partial_unexpected_list") or []
        missing = result.result.get("partial_missing_list") or []
        keys = [f"unexpected value {v!r}" for v in unexpected] + [
            f"missing value {v!r}" for v in missing
        ]
    if not keys:
        observed = result.result.get("observed_value")
        if observed is not None:
            keys = [f"observed {observed}"]
    return keys


def _outcome(batch: str, result: Any) -> dict[str, Any]:
    config = result.expectation_config
    column = config.kwargs.get("column")
    return {
        "batch": batch,
        "expectation": config.type,
        "column": column,
        "severity": str(getattr(config.severity, "value", config.severity)),
        "success": bool(result.success),
        "unexpected_count": result.result.get("unexpected_count"),
        "offending": _offending(result)[:100],
    }


def describe_outcome(outcome: dict[str, Any]) -> str:
    where = f"[{outcome['batch']}] {outcome['expectation']}"
    if outcome["column"]:
        where += f" on column '{outcome['column']}'"
    rows = outcome["offending"]
    shown = ", ".join(rows[:MAX_ROWS_IN_MESSAGE]) + (
        " ..." if len(rows) > MAX_ROWS_IN_MESSAGE else ""
    )
    count = outcome["unexpected_count"] if outcome["unexpected_count"] is not None else "some"
    return f"{where}: {count} offending row(s): {shown or '(table level)'}"
