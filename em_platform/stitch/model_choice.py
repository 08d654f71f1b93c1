"""The per-tile model a montage's matches call for: translation, rigid or affine, chosen from the data.

Real scope tiles turn by a few hundredths of a degree and a translation solve leaves that as error (a hard
montage of ±0.05° tiles: 0.46 px from the truth against a rigid solve's 0.11 px), while a flexible model
fitted to a montage without it only fits the matcher's noise. So each step up the chain translation →
rigid → affine is taken only when it pays for its parameters by Akaike's criterion: the drop of the
residual sum of squares over the same point pairs (every pair its edge's consensus keeps, so all models
are judged on one set), in units of the richer model's noise per axis, must exceed twice the parameters
it adds (1 per tile for rigid, 3 more for affine), the noise never taken below ``MIN_NOISE_PX``. Under no rotation the drop is a χ² of as many degrees
of freedom as parameters, so on a montage of any size a turn the data do not show is not taken; on the
real 4,969-tile TEMCA montage each step pays many times over. The polynomial model is never chosen (it is
not fused). Dagster-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from em_platform.stitch.layout import Model, PointEdge, TileId, TransformLayout
from em_platform.stitch.solve_affine import solve_transforms

__all__ = ["CHAIN", "PARAMETERS", "Requested", "solve_auto", "solve_model"]

Requested = Model | Literal["auto"]  # what a user asks for: a model, or the one the matches call for

CHAIN: tuple[Model, ...] = ("translation", "rigid", "affine")
PARAMETERS = {"translation": 2, "rigid": 3, "affine": 6}  # per tile
# a matched point is not better than this (px per axis; a matcher's bias on real images): residuals below it
# are no evidence of a turn (6 synthetic tiles matched to 0.014 px otherwise "paid" for a rigid model)
MIN_NOISE_PX = 0.05


def _sum_of_squares(layout: TransformLayout[Any]) -> tuple[float, int]:
    """(Σ d², pairs) over the consensus pairs: E d² = std² + mean² of the distances."""
    stats = layout.inlier_residual_stats
    pairs = int(stats.get("pairs", 0))
    if not pairs:
        return 0.0, 0
    return pairs * (stats["std_px"] ** 2 + stats["mean_px"] ** 2), pairs


def solve_auto(
    stage: Mapping[TileId, tuple[float, float]],
    point_edges: Iterable[PointEdge[TileId]],
    *,
    tile_size: tuple[float, float],
    **options: Any,
) -> TransformLayout[TileId]:
    """Solve up the chain while each step pays (module docstring); the layout of the model chosen, with
    :attr:`TransformLayout.model_choice` saying why."""
    edges = list(point_edges)
    n = len(stage)
    best = solve_transforms(stage, edges, "translation", tile_size=tile_size, **options)
    rss, pairs = _sum_of_squares(best)
    steps: list[dict[str, Any]] = [{"model": "translation", "sum_of_squares_px2": round(rss, 3)}]
    for model in CHAIN[1:]:
        if pairs == 0:
            break
        richer = solve_transforms(stage, edges, model, tile_size=tile_size, **options)
        rss_richer, _ = _sum_of_squares(richer)
        added = (PARAMETERS[model] - PARAMETERS[best.model]) * n
        dof = max(2 * pairs - PARAMETERS[model] * n, 1)
        noise = max(rss_richer / dof, MIN_NOISE_PX**2)  # per axis, px²
        gain = (rss - rss_richer) / noise
        taken = bool(gain > 2 * added)
        steps.append(
            {
                "model": model,
                "sum_of_squares_px2": round(rss_richer, 3),
                "chi2_gain": round(float(gain), 1),
                "penalty": 2 * added,
                "taken": taken,
            }
        )
        if not taken:
            break
        best, rss = richer, rss_richer
    best.model_choice = {"chosen": best.model, "pairs": pairs, "steps": steps}
    return best


def solve_model(
    stage: Mapping[TileId, tuple[float, float]],
    point_edges: Iterable[PointEdge[TileId]],
    model: Requested = "auto",
    *,
    tile_size: tuple[float, float],
    **options: Any,
) -> TransformLayout[TileId]:
    """The layout for ``model`` (:func:`~em_platform.stitch.solve_affine.solve_transforms`), or, for ``"auto"``,
    for the model the matches call for (:func:`solve_auto`): what the montage asset and ``em-platform stitch``
    ask for."""
    if model == "auto":
        return solve_auto(stage, point_edges, tile_size=tile_size, **options)
    return solve_transforms(stage, point_edges, model, tile_size=tile_size, **options)
