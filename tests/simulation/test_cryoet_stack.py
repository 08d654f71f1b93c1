"""A simulated tilt series end to end: the files of the contract, its truth checked against the pixels."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mdocfile
import mrcfile
import numpy as np
import pytest
import tifffile
from scipy import ndimage, optimize
from scipy.spatial.transform import Rotation
from skimage.registration import phase_cross_correlation

from em_platform.simulation.cryoet import stack as stack_mod
from em_platform.simulation.cryoet.spec import spec_from_dict
from em_platform.simulation.cryoet.stack import simulate_stack
from em_platform.simulation.truth import read_ground_truth
from em_platform.storage import DataStore

BEADS = {
    "name": "beads",
    "seed": 11,
    "apix": 0.5,
    "bead_occupancy": 0.007,
    "bead_radius": 4.0,
    "defocus_values": [0.5],
    "sample": {"thickness": 30, "ice": "none"},
    "detector": {"det_pix_x": 192, "det_pix_y": 160, "mtf_a": 0, "mtf_b": 0, "mtf_c": 1},
    "geometry": {
        "theta_start": -45,
        "theta_incr": 15,
        "ntilts": 7,
        "tilt_scheme": "dose_symmetric",
        "tilt_axis": 10.0,
        "tilt_err": 1.5,
        "align_err_rot": 1.0,
        "align_err_tr": 3.0,
    },
    "electronbeam": {"dose_per_tilt": 100.0},  # bright frames: drift measurable in single frames
    "optics": {"defocus_nonsyst_error": 0.0},
    "movies": {"frames": 5, "drift": 3.0, "drift_jitter": 0.2},
    "simulation": {"phantom_binning": 4},
}


@pytest.fixture(scope="module")
def bead_stack(tmp_path_factory):
    store = DataStore(str(tmp_path_factory.mktemp("simroot")))
    spec = spec_from_dict(BEADS)
    result = simulate_stack(spec, 0, store, workers=2)
    return spec, result, Path(result.folder)


def test_stack_folder_holds_the_contract_files(bead_stack):
    spec, result, folder = bead_stack
    stack = "beads_000"
    assert result.stack == stack and folder.name == stack and folder.parent.name == "beads"
    truth = read_ground_truth(folder / "ground_truth.json")
    n = len(truth.tilts)
    with mrcfile.open(folder / f"{stack}.mrc") as mrc:
        assert mrc.data.shape == (n, 160, 192) and mrc.data.dtype == np.float32
        assert mrc.voxel_size.x == pytest.approx(5.0) and mrc.voxel_size.z == pytest.approx(5.0)
        assert mrc.header.dmean == pytest.approx(float(mrc.data.mean()), rel=1e-4)
    assert mrcfile.read(folder / f"{stack}_noiseless.mrc").shape == (n, 160, 192)
    nominal = [float(v) for v in (folder / f"{stack}.tlt").read_text().split()]
    assert nominal == pytest.approx([t.nominal_angle_deg for t in truth.tilts])
    assert nominal[:3] == [0.0, 15.0, 30.0]  # dose-symmetric: acquisition order, not sorted
    df = mdocfile.read(folder / f"{stack}.mrc.mdoc")
    assert list(df["ZValue"]) == list(range(n))
    assert list(df["TiltAngle"]) == pytest.approx(nominal)
    assert set(df["Defocus"]) == {-0.5}  # nominal, µm, negative = underfocus (SerialEM)
    assert float(df["PixelSpacing"].iloc[0]) == pytest.approx(5.0)
    frames = [Path(str(p).replace("\\", "/")).name for p in df["SubFramePath"]]
    assert frames == [Path(t.frames.file).name for t in truth.tilts]
    for t in truth.tilts:
        movie = tifffile.imread(folder / t.frames.file)
        assert movie.shape == (5, 160, 192) and movie.dtype.kind == "u"
    phantom = mrcfile.read(folder / "phantom.mrc")
    assert phantom.shape == tuple(truth.phantom.shape_zyx) == (16, 40, 48)  # 30 nm at 4 × 5 Å
    assert truth.tilts[0].defocus_u_A == pytest.approx(5000.0)
    assert truth.tilts[3].accumulated_dose_e_per_A2 == pytest.approx(300.0)
    assert len(truth.fiducials) == 6 and not truth.particles  # 0.007 × 96 × 80 × 30 nm³ / (4π/3·4³)
    raw = json.loads((folder / "ground_truth.json").read_text())
    assert raw["schema"] == "em_platform.simulation.ground_truth/1"
    assert raw["spec"]["geometry"]["tilt_err"] == 1.5 and raw["files"]["gain_ref"] == "gain_ref.mrc"


def _bead_centres(image: np.ndarray, expected: int) -> np.ndarray:
    """(x, y) centroids of the dark gold beads."""
    smooth = ndimage.gaussian_filter(image, 2.0)
    dark = smooth < smooth.mean() - 0.5 * smooth.std()
    labels, n = ndimage.label(dark)
    sizes = ndimage.sum(dark, labels, range(1, n + 1))
    keep = [i + 1 for i in np.argsort(sizes)[::-1][:expected]]
    weights = np.clip(smooth.max() - smooth, 0, None)
    centres = ndimage.center_of_mass(weights, labels, keep)
    return np.array([(c[1], c[0]) for c in centres])


def _project(pos_nm: np.ndarray, theta: float, rot: float, shift, pixel_A: float, shape) -> np.ndarray:
    """The contract's geometry, written out independently of the simulator."""
    x, y, z = (pos_nm * 10 / pixel_A).T
    t, r = math.radians(theta), math.radians(rot)
    xt = x * math.cos(t) + z * math.sin(t)
    return np.stack(
        [
            xt * math.cos(r) - y * math.sin(r) + shift[0] + shape[1] // 2,
            xt * math.sin(r) + y * math.cos(r) + shift[1] + shape[0] // 2,
        ],
        axis=1,
    )


def test_geometry_errors_in_the_truth_are_the_ones_in_the_images(bead_stack):
    """Fit tilt angle, in-plane rotation and shift to the beads of the noiseless stack; compare to truth."""
    _, _, folder = bead_stack
    truth = read_ground_truth(folder / "ground_truth.json")
    noiseless = mrcfile.read(folder / "beads_000_noiseless.mrc")
    beads = np.array([f.position_nm for f in truth.fiducials])
    shape = truth.image_shape_yx
    for t in truth.tilts:
        seen = _bead_centres(noiseless[t.z_index], len(beads))

        def residual(p, seen=seen):
            pred = _project(beads, p[0], p[1], p[2:], truth.pixel_size_A, shape)
            return np.min(np.linalg.norm(pred[:, None] - seen[None], axis=2), axis=1)

        start = [t.nominal_angle_deg, truth.tilt_axis_angle_deg, 0.0, 0.0]
        fit = optimize.least_squares(residual, start, loss="soft_l1", f_scale=0.5).x  # beads may overlap
        assert fit[0] == pytest.approx(t.true_angle_deg, abs=0.5), t
        assert fit[1] == pytest.approx(truth.tilt_axis_angle_deg + t.in_plane_rotation_deg, abs=0.3), t
        assert fit[2:] == pytest.approx(t.shift_px, abs=0.3), t
    # and the errors are not negligible, so this did test something
    assert max(abs(t.true_angle_deg - t.nominal_angle_deg) for t in truth.tilts) > 1.0
    assert max(abs(v) for t in truth.tilts for v in t.shift_px) > 2.0


def test_movie_frames_carry_the_drift_written_in_the_truth(bead_stack):
    """Each gain-normalised frame, registered on the (undrifted) noiseless micrograph, sits at its drift."""
    _, _, folder = bead_stack
    truth = read_ground_truth(folder / "ground_truth.json")
    gain_ref = mrcfile.read(folder / "gain_ref.mrc")
    noiseless = mrcfile.read(folder / "beads_000_noiseless.mrc")
    errors = []
    for t in truth.tilts:
        frames = tifffile.imread(folder / t.frames.file).astype(np.float32) * gain_ref  # normalised frames
        reference = ndimage.gaussian_filter(noiseless[t.z_index], 1.5)
        for i, (dx, dy) in enumerate(t.frames.drift_px):
            moved = ndimage.gaussian_filter(frames[i], 1.5)
            sy, sx = phase_cross_correlation(reference, moved, upsample_factor=20, normalization=None)[0]
            # the shift that registers frame i onto the micrograph undoes its drift
            errors.append(math.hypot(-sx - dx, -sy - dy))
    assert np.sqrt(np.mean(np.square(errors))) < 0.2 and max(errors) < 0.5, errors
    assert np.abs(np.asarray(truth.tilts[0].frames.drift_px)).max() > 1.5


def test_particle_rotations_are_recorded_in_all_three_spellings(tmp_path):
    spec = spec_from_dict(
        {
            "name": "rot",
            "apix": 1.0,
            "particles": [{"model": "apoferritin_6z6u", "count": 3}],
            "sample": {"thickness": 40},
            "detector": {"det_pix_x": 64, "det_pix_y": 64},
            "geometry": {"ntilts": 1, "theta_start": 0},
        }
    )
    # truth only (no pixels): the assembly and its records
    from em_platform.simulation.cryoet.acquisition import ASSEMBLY, rng_for
    from em_platform.simulation.cryoet.assembly import assemble, rotation_record
    from em_platform.simulation.cryoet.models import load_library

    spec = spec.model_copy(
        update={"detector": spec.detector.model_copy(update={"det_pix_x": 600, "det_pix_y": 600})}
    )
    sample = assemble(spec, load_library(spec), rng_for(spec, 0, ASSEMBLY))
    centres = np.array([p.position_A for p in sample.particles])
    assert np.linalg.norm(centres[:, None] - centres[None], axis=2)[np.triu_indices(3, 1)].min() > 2 * 69
    for p in sample.particles:
        rec = rotation_record(p.rotation)
        r = np.asarray(rec["rotation_matrix"])
        rot, tilt, psi = np.radians(rec["euler_zyz_deg"])
        # RELION's Euler_angles2matrix(rot, tilt, psi), written out from its source
        ca, sa, cb, sb, cg, sg = (
            np.cos(rot),
            np.sin(rot),
            np.cos(tilt),
            np.sin(tilt),
            np.cos(psi),
            np.sin(psi),
        )
        relion = np.array(
            [
                [cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
                [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
                [sb * ca, sb * sa, cb],
            ]
        )
        np.testing.assert_allclose(relion, r, atol=1e-9)
        w, x, y, z = rec["quaternion_wxyz"]
        np.testing.assert_allclose(Rotation.from_quat([x, y, z, w]).as_matrix(), r, atol=1e-9)
        assert abs(p.position_A[2]) <= 200 - 20 - 69


def test_same_seed_same_stack_whatever_the_parallelism(tmp_path):
    doc = {**BEADS, "name": "repro", "movies": {"frames": 0}, "detector": {"det_pix_x": 64, "det_pix_y": 64}}
    doc["geometry"] = {**BEADS["geometry"], "ntilts": 3, "theta_start": -15}
    spec = spec_from_dict(doc)
    a = simulate_stack(spec, 0, DataStore(str(tmp_path / "a")), workers=1)
    b = simulate_stack(spec, 0, DataStore(str(tmp_path / "b")), workers=2)
    one = mrcfile.read(Path(a.folder) / "repro_000.mrc")
    two = mrcfile.read(Path(b.folder) / "repro_000.mrc")
    np.testing.assert_array_equal(one, two)
    other = simulate_stack(spec, 1, DataStore(str(tmp_path / "a")), workers=1)
    assert not np.array_equal(mrcfile.read(Path(other.folder) / "repro_001.mrc"), one)


def test_a_failing_tilt_publishes_nothing_and_a_rerun_completes(tmp_path, monkeypatch):
    doc = {**BEADS, "name": "fail", "movies": {"frames": 0}, "detector": {"det_pix_x": 64, "det_pix_y": 64}}
    spec = spec_from_dict(doc)
    store = DataStore(str(tmp_path))
    real = stack_mod.render_tilt

    def broken(imager, detector, job, sensitivity):
        if job.index == 4:
            raise RuntimeError("detector readout failed")
        return real(imager, detector, job, sensitivity)

    monkeypatch.setattr(stack_mod, "render_tilt", broken)
    with pytest.raises(RuntimeError, match="readout"):
        simulate_stack(spec, 0, store, workers=2)
    assert not (tmp_path / "simulation" / "fail" / "fail_000").exists()
    assert not [p for p in (tmp_path / ".staging").rglob("*") if p.is_file()]
    monkeypatch.setattr(stack_mod, "render_tilt", real)
    result = simulate_stack(spec, 0, store, workers=2)
    assert (Path(result.folder) / "ground_truth.json").is_file()


def test_a_stack_on_s3_is_catalogued_from_s3_as_from_a_folder(tmp_path, s3_bucket):
    """The deployment's data root is S3: the stack's OME-Zarr is made by reading the published MRC back from
    there, tilt by tilt, as from a local folder (an S3 data root failed once: mrcfile opened the S3 file
    object as a path; found on the compose containers)."""
    import zarr

    from em_platform.catalog.db import CatalogDB
    from em_platform.simulation.cryoet.catalog_record import simulate_and_catalog

    doc = {**BEADS, "name": "s3", "movies": {"frames": 0}, "detector": {"det_pix_x": 64, "det_pix_y": 48}}
    doc["geometry"] = {**BEADS["geometry"], "ntilts": 3, "theta_start": -15}
    spec = spec_from_dict(doc)
    root, opts = s3_bucket
    tilts = {}
    for name, store in (("s3", DataStore(f"{root}/em", opts)), ("local", DataStore(str(tmp_path / "local")))):
        db = CatalogDB(f"sqlite:///{tmp_path}/{name}.sqlite")
        try:
            lineage = {"asset_key": "simulation/tilt_series", "run_id": "test"}
            published = simulate_and_catalog(spec, 0, store=store, catalog=db, lineage=lineage)
        finally:
            db.dispose()
        assert published.record["status"] == "complete"
        level0 = zarr.open_group(
            published.volume_url, mode="r", storage_options=store.storage_options or None
        )
        tilts[name] = level0["0"][...]
    assert tilts["s3"].shape == (3, 48, 64)
    np.testing.assert_array_equal(tilts["s3"], tilts["local"])


def test_a_stack_on_s3_gets_a_local_session_copy_cryo_discovers(tmp_path, s3_bucket):
    """With an S3 data root the simulation run copies each published stack into the download cache, whole
    and renamed into place, where the cryo sensor discovers it as a session; a complete copy is kept."""
    from em_platform.cryo.session import discover
    from em_platform.simulation.cryoet.session_copy import copy_session, session_copies_root
    from em_platform.simulation.cryoet.stack import stack_folder

    doc = {**BEADS, "name": "copied", "movies": {"frames": 2}, "detector": {"det_pix_x": 64, "det_pix_y": 48}}
    doc["geometry"] = {**BEADS["geometry"], "ntilts": 3, "theta_start": -15}
    spec = spec_from_dict(doc)
    root, opts = s3_bucket
    store = DataStore(f"{root}/em", opts)
    simulate_stack(spec, 0, store, workers=1)
    copies = session_copies_root(tmp_path / "downloads")
    folder = stack_folder(store, spec, 0)
    copy = copy_session(store, folder, copies, spec.name, "copied_000")
    assert copy == copies / "copied" / "copied_000"
    published = {p.split(folder + "/", 1)[1]: store.fs.info(p)["size"] for p in store.fs.find(folder)}
    assert {
        p.relative_to(copy).as_posix(): p.stat().st_size for p in copy.rglob("*") if p.is_file()
    } == published
    assert not [p for p in copies.rglob(".*")]  # no partial copy left behind
    np.testing.assert_array_equal(
        mrcfile.read(copy / "copied_000.mrc"),
        np.frombuffer(store.fs.cat(f"{folder}/copied_000.mrc")[1024:], np.float32).reshape(3, 48, 64),
    )
    found, errors = discover(copies, "simulation")
    assert errors == {} and [ts.key for ts in found] == ["copied_000"]
    mtime = (copy / "copied_000.mrc").stat().st_mtime_ns
    assert copy_session(store, folder, copies, spec.name, "copied_000") == copy
    assert (copy / "copied_000.mrc").stat().st_mtime_ns == mtime  # kept, not fetched again
