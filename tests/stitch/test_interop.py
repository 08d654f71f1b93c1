"""``em-platform stitch --matches FILE`` with render/em_stitch point-match JSON, and the tile specs it exports.

The montage comes from :mod:`tests.stitch.synthetic` (tiles written, so the command can open the
folder and measure seams); its point matches are made from the truth
(:meth:`~tests.stitch.synthetic.HardMontage.point_matches`) and written here by hand in render's
format, ``{"pGroupId", "pId", "qGroupId", "qId", "matches": {"p": [[x…], [y…]], "q": [[x…], [y…]],
"w": [w…]}}``, the way em_stitch writes them: tile ids as render's (file stems) or file names, one tile
pair split over two records, one written from the other tile's side, and pairs em_stitch's filter
dropped marked ``w = 0``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from em_platform.cli import main
from em_platform.stitch.interop import AFFINE_CLASS, MatchFileError, read_point_matches
from em_platform.stitch.lens import LensModel
from tests.stitch.synthetic import HardMontage, HardMontageConfig, make_montage

POLYNOMIAL_CLASS = "mpicbg.trakem2.transform.PolynomialTransform2D"
ROWS, COLUMNS, TILE_PX = 3, 4, 256


def small_montage(lens: tuple[float, float, float] | None = None) -> HardMontage:
    return make_montage(
        HardMontageConfig(
            rows=ROWS, columns=COLUMNS, tile_px=TILE_PX, overlap=0.125, stage_error=0.3, rotation_deg=0.3,
            lens=lens, seed=8,
        )
    )  # fmt: skip


def render_record(p_id: str, q_id: str, p: np.ndarray, q: np.ndarray, w: np.ndarray) -> dict:
    return {
        "pGroupId": "1.0",
        "pId": p_id,
        "qGroupId": "1.0",
        "qId": q_id,
        "matches": {"p": p.T.tolist(), "q": q.T.tolist(), "w": w.tolist()},
    }


def write_render_matches(montage: HardMontage, path: Path, noise_px: float = 0.05) -> dict:
    """The montage's matches in render's format, with em_stitch's quirks (module docstring). Every edge
    also carries pairs that are wrong and outnumber the right ones, marked dropped (w = 0): read as
    pairs, they would win. Returns the genuine pairs by (tile, neighbour) file names."""
    matches = montage.point_matches(points_per_edge=12, noise_px=noise_px, seed=2)
    wrong = montage.point_matches(points_per_edge=24, noise_px=noise_px, seed=3)
    records, genuine = [], {}
    for i, (e, bad) in enumerate(zip(matches.edges, wrong.edges, strict=True)):
        genuine[(e.tile, e.neighbour)] = (e.p, e.q)
        p = np.concatenate([e.p, bad.p])
        q = np.concatenate([e.q, bad.q + (-9.0, 7.0)])  # agreeing with each other: twice the right ones
        w = np.concatenate([np.ones(len(e.p)), np.zeros(len(bad.p))])
        p_id, q_id = Path(e.tile).stem, Path(e.neighbour).stem
        if i == 0:  # full file names work too
            p_id, q_id = e.tile, e.neighbour
        if i == 1:  # one pair in two records
            half = len(p) // 2
            records.append(render_record(p_id, q_id, p[:half], q[:half], w[:half]))
            records.append(render_record(p_id, q_id, p[half:], q[half:], w[half:]))
        elif i == 2:  # written from the neighbour's side
            records.append(render_record(q_id, p_id, q, p, w))
        else:
            records.append(render_record(p_id, q_id, p, q, w))
    path.write_text(json.dumps(records))
    return genuine


def stitch_with_matches(tmp_path: Path, montage: HardMontage, *extra: str) -> tuple[int, Path, dict]:
    folder = tmp_path / "tiles"
    layout = montage.write(folder, workers=2)
    genuine = write_render_matches(montage, tmp_path / "matches.json")
    out = tmp_path / "out" / "m.zarr"
    code = main(["stitch", str(folder), "--layout", str(layout), "--out", str(out), "--no-fuse",
                 "--matches", str(tmp_path / "matches.json"), "--workers", "2", "--seams", *extra])  # fmt: skip
    return code, out.parent, genuine


def affine_of(leaf: dict) -> np.ndarray:
    """render's AffineModel2D dataString "m00 m10 m01 m11 m02 m12" as a 2×3 matrix."""
    m00, m10, m01, m11, m02, m12 = map(float, leaf["dataString"].split())
    return np.array([[m00, m01, m02], [m10, m11, m12]])


def polynomial_of(leaf: dict, xy: np.ndarray) -> np.ndarray:
    """render's PolynomialTransform2D at points ``xy``: coefficients for x then y, monomials
    1, x, y, x², xy, y², … (each order's terms from the highest power of x down)."""
    coefficients = np.array(leaf["dataString"].split(), float).reshape(2, -1)
    x, y = xy[:, 0], xy[:, 1]
    terms, order = [], 0
    while len(terms) < coefficients.shape[1]:
        terms += [x ** (order - j) * y**j for j in range(order + 1)]
        order += 1
    return np.column_stack([coefficients[0] @ np.array(terms), coefficients[1] @ np.array(terms)])


def angle_deg(m: np.ndarray) -> float:
    return float(np.degrees(np.arctan2(m[1, 0] - m[0, 1], m[0, 0] + m[1, 1])))


def read_positions(path: Path) -> dict[str, tuple[float, float]]:
    rows = path.read_text().splitlines()[1:]
    return {name: (float(x), float(y)) for name, x, y in (r.split(",") for r in rows)}


def test_render_point_matches_are_solved_and_exported_as_tile_specs(tmp_path, capsys):
    montage = small_montage()
    code, out, genuine = stitch_with_matches(tmp_path, montage, "--model", "rigid", "--z", "7")
    printed = capsys.readouterr()
    assert code == 0, printed.err
    doc = json.loads((out / "m.report.json").read_text())
    assert doc["source"] == f"matches {tmp_path / 'matches.json'}" and doc["passed"]
    assert doc["edges"]["accepted"] == len(genuine) and doc["edges"]["rejected"] == []
    assert doc["residuals"]["pairs"] == sum(len(p) for p, _ in genuine.values())  # w = 0 left out
    assert doc["seams"]["measured"] == len(genuine) and doc["seams"]["max_px"] < 0.25  # on the pixels

    # positions: where each tile's pixel (0, 0) lands, as the truth puts it (common motion removed)
    positions = read_positions(out / "m.positions.csv")
    assert sorted(positions) == sorted(montage.transforms())
    specs = json.loads((out / "m.tilespecs.json").read_text())
    transforms = {}
    for spec in specs:
        assert spec["z"] == 7.0
        name = Path(spec["mipmapLevels"]["0"]["imageUrl"]).name
        assert spec["tileId"] == Path(name).stem  # render's id: em_stitch's pId, not the file name
        assert (spec["width"], spec["height"]) == (TILE_PX, TILE_PX)
        assert (
            Path(spec["mipmapLevels"]["0"]["imageUrl"].removeprefix("file://")) == tmp_path / "tiles" / name
        )
        assert spec["transforms"]["type"] == "list"
        [leaf] = spec["transforms"]["specList"]  # no lens given: the tile's affine only
        assert leaf["type"] == "leaf" and leaf["className"] == AFFINE_CLASS
        m = affine_of(leaf)
        transforms[name] = m
        assert m[:, 2] == pytest.approx(positions[name], abs=1e-3)  # the same solve as the positions
        assert m[:, :2] @ m[:, :2].T == pytest.approx(np.eye(2), abs=1e-9)  # rigid: a rotation
    placed = montage.block_displacement(transforms)
    assert placed["max_px"] < 0.1, placed
    assert placed["similarity_removed"]["scale"] == pytest.approx(1.0, abs=1e-4)  # the images' frame
    # each tile's rotation as the truth has it, up to the montage's common turn
    truth = montage.transforms()
    turn = np.array([angle_deg(transforms[n]) - angle_deg(truth[n]) for n in truth])
    assert np.abs(turn - turn.mean()).max() < 0.01

    # the matches used are written back in render's format and read the same
    names = {Path(n).stem: n for n in positions}
    written = json.loads((out / "m.matches.json").read_text())
    assert {r["pGroupId"] for r in written} == {"7.0"} and {r["pId"] for r in written} <= set(names)
    used = {(e.tile, e.neighbour): e for e in read_point_matches(out / "m.matches.json", names)}
    assert len(used) == len(genuine)
    for (a, b), (p, q) in genuine.items():
        e = used[(a, b)] if (a, b) in used else used[(b, a)]
        got_p, got_q = (e.p, e.q) if (a, b) in used else (e.q, e.p)
        order = np.lexsort(got_p.T)
        assert got_p[order] == pytest.approx(p[np.lexsort(p.T)]) and got_q[order] == pytest.approx(
            q[np.lexsort(p.T)]
        )


def test_tile_specs_with_a_lens_chain_the_correction_before_the_affine(tmp_path, capsys):
    montage = small_montage(lens=(0.004, 0.0, 0.0))
    lens_file = tmp_path / "lens.json"
    lens_file.write_text(json.dumps(montage.lens.to_dict()))
    code, out, genuine = stitch_with_matches(tmp_path, montage, "--model", "affine", "--lens", str(lens_file))
    assert code == 0, capsys.readouterr().err
    specs = {  # by file name, as the genuine pairs are keyed
        Path(s["mipmapLevels"]["0"]["imageUrl"]).name: s
        for s in json.loads((out / "m.tilespecs.json").read_text())
    }
    for spec in specs.values():
        first, second = spec["transforms"]["specList"]
        assert first["className"] == POLYNOMIAL_CLASS and second["className"] == AFFINE_CLASS

    def render_places(tile: str, xy: np.ndarray) -> np.ndarray:
        first, second = specs[tile]["transforms"]["specList"]
        m = affine_of(second)
        return polynomial_of(first, xy) @ m[:, :2].T + m[:, 2]

    # the polynomial leaf is the lens correction x + D(x) in raw tile pixels …
    grid = np.array([(x, y) for x in (0, 100, 255) for y in (0, 128, 255)], float)
    name = next(iter(specs))
    assert polynomial_of(specs[name]["transforms"]["specList"][0], grid) == pytest.approx(
        LensModel.from_dict(json.loads(lens_file.read_text())).correct(grid), abs=1e-6
    )
    # … and the chain puts both points of every genuine pair (recorded, distorted pixels) together
    gaps = np.concatenate(
        [np.hypot(*(render_places(a, p) - render_places(b, q)).T) for (a, b), (p, q) in genuine.items()]
    )
    assert gaps.mean() < 0.15 and gaps.max() < 0.5
    without = np.concatenate(  # the affine alone (the lens left out) does not
        [
            np.hypot(*((p @ affine_of(specs[a]["transforms"]["specList"][1])[:, :2].T
                        + affine_of(specs[a]["transforms"]["specList"][1])[:, 2])
                       - (q @ affine_of(specs[b]["transforms"]["specList"][1])[:, :2].T
                          + affine_of(specs[b]["transforms"]["specList"][1])[:, 2])).T)
            for (a, b), (p, q) in genuine.items()
        ]
    )  # fmt: skip
    assert without.mean() > 3 * gaps.mean()


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"pId": "a", "qId": "b"}, "needs pId, qId and matches.p/q"),
        ({"pId": "a", "qId": "b", "matches": {"p": [[1, 2]], "q": [[1, 2]]}}, "must both be [[x…], [y…]]"),
        (
            {"pId": "a", "qId": "b", "matches": {"p": [[1], [2]], "q": [[1], [2]], "w": [1, 1]}},
            "one finite weight per point pair",
        ),
    ],
)
def test_malformed_match_records_are_named(tmp_path, record, message):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(MatchFileError, match="match 0") as caught:
        read_point_matches(path)
    assert message in str(caught.value)


def test_matches_naming_no_tile_of_the_layout_exit_2(tmp_path, capsys):
    montage = small_montage()
    folder = tmp_path / "tiles"
    layout = montage.write(folder, workers=2)
    (tmp_path / "m.json").write_text(
        json.dumps([render_record("x", "y", np.zeros((3, 2)), np.ones((3, 2)), np.ones(3))])
    )
    code = main(["stitch", str(folder), "--layout", str(layout), "--out", str(tmp_path / "o.zarr"),
                 "--no-fuse", "--matches", str(tmp_path / "m.json")])  # fmt: skip
    assert code == 2 and "no point match names two tiles" in capsys.readouterr().err


def test_a_match_collection_is_read_from_a_url_as_from_a_path(tmp_path):
    """The montage assets take the scope's collection by URL (s3:// on the storage root): the fsspec branch
    reads the same edges as the local one, gzipped or not, and names the URL when it cannot."""
    import gzip

    record = {
        "pId": "a",
        "qId": "b",
        "matches": {"p": [[1.0, 2.0], [3.0, 4.0]], "q": [[5.0, 6.0], [7.0, 8.0]]},
    }
    path = tmp_path / "m.json.gz"
    path.write_bytes(gzip.compress(json.dumps([record]).encode()))
    (local,) = read_point_matches(path)
    (remote,) = read_point_matches(path.as_uri())
    assert (remote.tile, remote.neighbour) == (local.tile, local.neighbour) == ("a", "b")
    assert np.array_equal(remote.p, local.p) and np.array_equal(remote.q, local.q)
    missing = (tmp_path / "absent.json").as_uri()
    with pytest.raises(MatchFileError, match="absent.json: cannot read the point matches"):
        read_point_matches(missing)
