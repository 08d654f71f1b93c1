"""An asset whose blocking check failed is not materialized: red in the partition bar, failed in the
catalog, never green beside its red check.

Dagster 1.13 records a materialization as soon as the asset yields it, and a blocking check that fails
afterwards only stops what is downstream: the asset page would show a green, "materialized" partition
next to its red check. :func:`gate_blocking_checks` wraps an asset's compute function: it collects what
the function reports, and for each asset key with a failed blocking check it withholds the
materialization, reports the check results (so the failure and its sentence are on the Checks tab), and
fails the step naming the checks, with the withheld metadata on the failure. Assets without a failed
blocking check are reported as before, materialization first.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import dagster as dg


def gate_blocking_checks(fn: Callable[..., Any]) -> Callable[..., Iterator[Any]]:
    """Decorator (under ``@dg.asset``/``@dg.multi_asset``) for compute functions with blocking checks."""

    @functools.wraps(fn)
    def compute(*args: Any, **kwargs: Any) -> Iterator[Any]:
        context = dg.AssetExecutionContext.get()
        reported: list[Any] = []
        try:
            out = fn(*args, **kwargs)
            reported.extend(out if inspect.isgenerator(out) else ([] if out is None else [out]))
        except BaseException:
            yield from (r for r in _flatten(reported) if isinstance(r, dg.AssetCheckResult))  # the reason
            raise
        yield from gated(context, reported)

    return compute


def gated(context: dg.AssetExecutionContext, reported: list[Any]) -> Iterator[Any]:
    """``reported`` in order, but without the materialization of an asset whose blocking check failed;
    then a failure naming those checks."""
    items = list(_flatten(reported))
    blocking = {(spec.asset_key, spec.name) for spec in context.assets_def.check_specs if spec.blocking}
    single = context.assets_def.key if len(context.assets_def.keys) == 1 else None
    blocked: dict[dg.AssetKey, list[dg.AssetCheckResult]] = {}
    for item in items:
        if isinstance(item, dg.AssetCheckResult) and not item.passed:
            key = item.asset_key or single
            if key is not None and (key, item.check_name) in blocking:
                blocked.setdefault(key, []).append(item)
    withheld: dict[str, Any] = {}
    for item in items:
        if isinstance(item, dg.MaterializeResult):
            key = item.asset_key or single
            if key in blocked:
                prefix = "" if single else f"{key.to_user_string()}: "
                withheld |= {f"{prefix}{k}": v for k, v in (item.metadata or {}).items()}
                continue
        yield item
    if blocked:
        names = "; ".join(  # each check named by a blocking spec (above): its name is a str
            f"{key.to_user_string()}: {', '.join(str(c.check_name) for c in checks)}"
            for key, checks in blocked.items()
        )
        first = next(iter(blocked.values()))[0]
        raise dg.Failure(
            description=f"blocking check(s) failed, so not materialized ({names}): {first.description or ''}",
            metadata={k: v for k, v in withheld.items() if not isinstance(v, dg.MarkdownMetadataValue)},
        )


def _flatten(reported: list[Any]) -> Iterator[Any]:
    """Materializations with their nested ``check_results`` split out (materialization first)."""
    for item in reported:
        if isinstance(item, dg.MaterializeResult) and item.check_results:
            yield item._replace(check_results=[])  # noqa: SLF001 (a NamedTuple's copy)
            yield from item.check_results
        else:
            yield item
