"""Point matches in and transforms out, in the forms render, em_stitch and BigFeta users read.

* **Point matches** (render's match service JSON, which em_stitch's solvers read and write): a list of
  ``{"pGroupId", "pId", "qGroupId", "qId", "matches": {"p": [[x…], [y…]], "q": [[x…], [y…]], "w": [w…]}}``;
  ``p`` are pixel coordinates in tile ``pId``, ``q`` the same specimen points in tile ``qId``. A file may
  also be ``{"matches": [...]}`` or hold one such object per line (JSON lines).
* **Tile specs** (render's ``TileSpec``, what BigFeta solves and writes back): per tile ``tileId``, ``z``,
  ``width``, ``height``, ``mipmapLevels["0"].imageUrl`` and ``transforms.specList``: the scope's lens
  correction (``mpicbg.trakem2.transform.PolynomialTransform2D``) first, when there is one, then the
  tile's ``mpicbg.trakem2.transform.AffineModel2D`` (``dataString`` "m00 m10 m01 m11 m02 m12", the
  column-major order of mpicbg's ``AffineModel2D.toDataString``).

Dagster-free.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from em_platform.stitch.layout import PointEdge
from em_platform.stitch.lens import LensModel

__all__ = ["MatchFileError", "read_point_matches", "tilespecs", "write_point_matches"]

AFFINE_CLASS = "mpicbg.trakem2.transform.AffineModel2D"


class MatchFileError(ValueError):
    """A point-match file that is not render/em_stitch point-match JSON: the message says where."""


def _records(path: Path | str, storage_options: Mapping[str, Any] | None = None) -> list[Any]:
    """The point-match records of a render collection file (a local path, or an fsspec URL read with
    ``storage_options``): a JSON list (or JSON lines), a render client's ``{"matches": [...]}``, or
    em_stitch's template-matches file ``{"collection": [...], "tilespecs", …}``; gzipped as render writes
    ``.json.gz``."""
    try:
        if isinstance(path, str) and "://" in path:
            import fsspec

            with fsspec.open(path, "rb", **(storage_options or {})) as f:
                raw = f.read()
        else:
            raw = Path(path).read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip, whatever the name says
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise MatchFileError(f"{path}: cannot read the point matches ({exc})") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise MatchFileError(
                f"{path} line {exc.lineno}: not JSON; expected render point-match JSON (a list of "
                "{pId, qId, matches: {p, q, w}})"
            ) from exc
    if isinstance(doc, Mapping) and "matches" in doc and isinstance(doc["matches"], list):
        doc = doc["matches"]
    if isinstance(doc, Mapping) and isinstance(doc.get("collection"), list):  # em_stitch's template form
        doc = doc["collection"]
    if isinstance(doc, Mapping):
        doc = [doc]
    if not isinstance(doc, list):
        raise MatchFileError(f"{path}: expected a list of point matches, found {type(doc).__name__}")
    return doc


def read_point_matches(
    path: str | os.PathLike,
    names: Mapping[str, str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[PointEdge]:
    """The point matches of ``path`` (a local file, or an fsspec URL such as ``s3://…`` read with
    ``storage_options``) as solver edges; ``names`` maps render tile ids to the caller's tile names
    (unmapped ids are kept as they are). Pairs of weight ``w`` = 0 (dropped by em_stitch's filter) are left
    out; the other pairs of one tile pair are merged into one edge, its weight the mean of their ``w``.
    Raises :class:`MatchFileError` naming the record and field."""
    if not (isinstance(path, str) and "://" in path):
        path = Path(path)
    names = names or {}
    merged: dict[tuple[str, str], list[np.ndarray]] = {}
    weights: dict[tuple[str, str], list[float]] = {}
    for i, record in enumerate(_records(path, storage_options)):
        where = f"{path}: match {i}"
        try:
            p_id, q_id, m = str(record["pId"]), str(record["qId"]), record["matches"]
            p = np.asarray(m["p"], np.float64)
            q = np.asarray(m["q"], np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise MatchFileError(
                f"{where}: needs pId, qId and matches.p/q as [[x…], [y…]] ({exc!r})"
            ) from exc
        if p.ndim != 2 or p.shape[0] != 2 or p.shape != q.shape:
            raise MatchFileError(f"{where} ({p_id}–{q_id}): p and q must both be [[x…], [y…]] of one length")
        if not (np.isfinite(p).all() and np.isfinite(q).all()):
            raise MatchFileError(f"{where} ({p_id}–{q_id}): coordinates must be finite")
        try:
            w = np.asarray(m.get("w", np.ones(p.shape[1])), np.float64).ravel()
        except (TypeError, ValueError):
            w = np.zeros(0)
        if w.shape != (p.shape[1],) or not np.isfinite(w).all():
            raise MatchFileError(f"{where} ({p_id}–{q_id}): w must hold one finite weight per point pair")
        keep = w > 0  # em_stitch's filter marks the pairs it dropped with w = 0
        if not keep.any():
            continue
        key = (names.get(p_id, p_id), names.get(q_id, q_id))
        merged.setdefault(key, []).append(np.hstack([p.T, q.T])[keep])
        weights.setdefault(key, []).extend(w[keep].tolist())
    return [
        PointEdge(tile, neighbour, np.vstack(v)[:, :2], np.vstack(v)[:, 2:], float(np.mean(weights[k])))
        for k, v in merged.items()
        for tile, neighbour in [k]
        if tile != neighbour
    ]


def write_point_matches(
    path: str | os.PathLike,
    edges: Iterable[PointEdge],
    group: str = "0",
    tile_ids: Mapping[str, str] | None = None,
) -> Path:
    """``edges`` as render point-match JSON (``pGroupId = qGroupId = group``: one section); ``tile_ids`` maps
    tile names to the ids the tile specs carry."""
    ids = tile_ids or {}
    doc = [
        {
            "pGroupId": group,
            "pId": ids.get(e.tile, str(e.tile)),
            "qGroupId": group,
            "qId": ids.get(e.neighbour, str(e.neighbour)),
            "matches": {
                "p": np.asarray(e.p, np.float64).T.tolist(),
                "q": np.asarray(e.q, np.float64).T.tolist(),
                "w": [float(e.weight)] * len(e.p),
            },
        }
        for e in edges
    ]
    path = Path(path)
    path.write_text(json.dumps(doc))
    return path


def affine_transform(matrix: np.ndarray) -> dict[str, Any]:
    """A 2×3 ``[A | t]`` as render's AffineModel2D leaf (data "m00 m10 m01 m11 m02 m12")."""
    m = np.asarray(matrix, np.float64)
    data = [m[0, 0], m[1, 0], m[0, 1], m[1, 1], m[0, 2], m[1, 2]]
    return {"type": "leaf", "className": AFFINE_CLASS, "dataString": " ".join(repr(float(v)) for v in data)}


def polynomial_transform(coefficients: np.ndarray) -> dict[str, str]:
    """A render ``PolynomialTransform2D`` leaf (order 2) of coefficients (2, 6) in ``1, x, y, x², xy, y²``,
    as render-python's ``Polynomial2DTransform`` writes it: the x row, then the y row."""
    c = np.asarray(coefficients, np.float64).reshape(2, 6)
    return {
        "type": "leaf",
        "className": "mpicbg.trakem2.transform.PolynomialTransform2D",
        "dataString": " ".join(repr(float(v)) for v in c.ravel()),
    }


def tilespecs(
    transforms: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, int]],
    *,
    image_dir: str | os.PathLike | None = None,
    lens: LensModel | None = None,
    z: float = 0.0,
    polynomials: Mapping[str, np.ndarray] | None = None,
    tile_ids: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Render tile specs of solved tiles: ``shapes`` are (height, width); images are ``image_dir/<tile>``;
    ``polynomials`` (model "polynomial": (2, 6) per tile) replace the affine leaf; ``tile_ids`` maps tile
    names to the ``tileId`` render and the point matches know them by (default: the name)."""
    ids = tile_ids or {}
    out = []
    for tile, matrix in transforms.items():
        height, width = shapes[tile]
        leaves = [lens.render_transform()] if lens is not None and not lens.is_identity() else []
        leaves.append(
            polynomial_transform(polynomials[tile]) if polynomials is not None else affine_transform(matrix)
        )
        spec: dict[str, Any] = {
            "tileId": ids.get(tile, str(tile)),
            "z": float(z),
            "width": int(width),
            "height": int(height),
            "transforms": {"type": "list", "specList": leaves},
        }
        if image_dir is not None:
            spec["mipmapLevels"] = {"0": {"imageUrl": Path(image_dir, str(tile)).absolute().as_uri()}}
        out.append(spec)
    return out
