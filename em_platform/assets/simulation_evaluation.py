"""``simulation/evaluation``: a simulated tilt series' processing scored against its ground truth.

One blocking check per figure (the rules: :mod:`em_platform.cryo.evaluation`), per tilt-series partition.
A check that does not apply (no ground truth, no tilt astigmatic enough to have an angle) goes unreported,
so Dagster shows it "skipped", never "passed"; the materialization's ``checks_not_applicable`` says why.
In group ``simulation``, as its key, though ``cryo_job`` runs it after the cryo steps.
"""

import math

import dagster as dg

from em_platform.assets.cryo import EVALUATION, FROM_SIMULATION, K, TomogramConfig, run_step, series_fields
from em_platform.assets.presentation import (
    check_result,
    check_sentence,
    materialize_result,
    partitioned_check,
)
from em_platform.assets.signals import gate_blocking_checks
from em_platform.cryo import evaluation as ev
from em_platform.cryo import processing as proc
from em_platform.cryo.optics import Microscope
from em_platform.cryo.results_db import CryoResults
from em_platform.cryo.session import TiltSeries
from em_platform.partitions import cryo_tilt_series
from em_platform.resources import CatalogResource, CryoSessionsResource, StorageResource


def _check_specs() -> list[dg.AssetCheckSpec]:
    """Each check per tilt-series partition, so its result shows under the partition it scored."""
    return [
        partitioned_check(name, EVALUATION, cryo_tilt_series, description, blocking=True)
        for name, description in ev.CHECK_DESCRIPTIONS.items()
    ]


# A multi_asset only so that its checks may go unreported (module docstring).
@dg.multi_asset(
    name="simulation__evaluation",
    specs=[
        dg.AssetSpec(
            EVALUATION,
            deps=[K["results"], FROM_SIMULATION],
            group_name="simulation",
            kinds={"json"},
            description="Every step scored against ground_truth.json and the phantom: defocus, astigmatism "
            "angle, drift, shifts, tilt axis, tomogram FSC (0.5 / 0.143) aligned vs nominal geometry, "
            "denoising PSNR gain.",
        )
    ],
    partitions_def=cryo_tilt_series,
    check_specs=_check_specs(),
    can_subset=True,
)
@gate_blocking_checks
def evaluation(
    context: dg.AssetExecutionContext,
    config: TomogramConfig,
    cryo_sessions: CryoSessionsResource,
    storage: StorageResource,
    catalog: CatalogResource,
):
    from em_platform.simulation.truth import read_ground_truth

    root = storage.cryo_root()

    def step(ts: TiltSeries):
        if ts.truth is None:
            return None
        scope = Microscope(ts.voltage_kV, config.cs_mm, config.amplitude_contrast)
        return ev.evaluate(
            ts, proc.Workspace(root, ts.key), read_ground_truth(ts.truth), scope, config.settings()
        )

    ts, fig = run_step(context, cryo_sessions, catalog, step)
    if fig is None:
        # a real session in a backfill of cryo_job (the sensor never asks): nothing to score, and the
        # processing's status in the results tables stays as it is
        reason = f"{ts.key} has no ground_truth.json beside its mdoc: nothing to score against"
        check_names = list(ev.CHECK_DESCRIPTIONS)
        yield materialize_result(
            metadata={
                "skipped": reason,
                "checks_not_applicable": dg.MetadataValue.json(dict.fromkeys(check_names, reason)),
            }
        )
        return  # no check result: each check is "skipped"
    flat = {k: v for k, v in fig.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    every = [_check_result(v) for v in ev.check_verdicts(fig)]
    checks = [c for c in every if "not_applicable" not in c.metadata]
    yield materialize_result(
        metadata={
            **{k: ev.finite(v) for k, v in flat.items()},
            "figures": dg.MetadataValue.json(_jsonable(fig)),
            "checks_not_applicable": dg.MetadataValue.json(  # each check named by its verdict (a str)
                {str(c.check_name): c.metadata["not_applicable"].value for c in every if c not in checks}
            ),
        }
    )
    failed = [c for c in checks if not c.passed]
    if failed:
        # the run fails on these blocking checks: the results tables say so too, with the figures
        results = CryoResults(catalog.url)
        try:
            results.mark(
                ts.key,
                "failed",
                series=series_fields(ts),
                error="blocking checks failed against ground_truth.json: "
                + "; ".join(_check_text(c) for c in failed),
                run_id=context.run.run_id,
            )
        finally:
            results.dispose()
    yield from checks


def _check_result(verdict: ev.CheckVerdict) -> dg.AssetCheckResult:
    description = verdict.description
    if description is None:
        description = check_sentence(verdict.measured, verdict.limit, verdict.passed, verdict.fix)
    return check_result(
        check_name=verdict.name, passed=verdict.passed, description=description, metadata=verdict.metadata
    )


def _check_text(check: dg.AssetCheckResult) -> str:
    """``name (key value, ...)`` from a check's numbers."""
    numbers = ", ".join(
        f"{k} {v.value:.3g}" if isinstance(v.value, float) else f"{k} {v.value}"
        for k, v in check.metadata.items()
        if isinstance(getattr(v, "value", None), int | float)
    )
    return f"{check.check_name} ({numbers})"


def _jsonable(doc):
    if isinstance(doc, dict):
        return {k: _jsonable(v) for k, v in doc.items() if k != "curve"}
    if isinstance(doc, list):
        return [_jsonable(v) for v in doc]
    if isinstance(doc, float) and not math.isfinite(doc):
        return str(doc)
    return doc
