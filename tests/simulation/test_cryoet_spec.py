"""Simulation specs: defaults, ETSimulations' conventions, and bad specs failing with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from em_platform import simulation
from em_platform.simulation.cryoet.models import ModelError, load_library
from em_platform.simulation.cryoet.spec import SpecError, load_spec, spec_from_dict, tilt_angles
from em_platform.simulation.cryoet.stack import simulate_stack
from em_platform.storage import DataStore


def test_defaults_are_the_etsimulations_template_with_a_realistic_dose():
    spec = spec_from_dict({"name": "template"})
    assert spec.detector.det_pix_x == 2000 and spec.apix == 0.283
    assert tilt_angles(spec.geometry) == [-54 + 3 * i for i in range(37)]
    assert (spec.geometry.tilt_err, spec.geometry.align_err_rot, spec.geometry.align_err_tr) == (
        0.5,
        0.25,
        0.25,
    )
    assert spec.electronbeam.dose_per_tilt == 3.0  # e/Å², not the template's 100
    assert spec.stack_names()[:1] == ["template_000"]


def test_defocus_values_are_assigned_round_robin():
    spec = spec_from_dict({"name": "d", "num_stacks": 5, "defocus_values": [2.0, 3.5]})
    assert [spec.defocus_um(i) for i in range(5)] == [2.0, 3.5, 2.0, 3.5, 2.0]


def test_dose_symmetric_order_starts_at_zero_and_alternates_in_groups():
    spec = spec_from_dict(
        {"name": "d", "geometry": {"tilt_scheme": "dose_symmetric", "theta_start": -9, "ntilts": 7}}
    )
    assert tilt_angles(spec.geometry) == [0, 3, 6, -3, -6, 9, -9]


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"name": "x", "electronbeam": {"dose": 3}}, "electronbeam.dose: unknown key"),
        ({"name": "x", "colour": "blue"}, "colour: unknown key"),
        ({"name": "x", "electronbeam": {"dose_per_tilt": -1}}, "electronbeam.dose_per_tilt"),
        ({"name": "x", "particles": [{"model": "missing.pdb"}]}, "particles[0].model: model file"),
        ({"name": "x", "particles": [{"model": "thing.xyz"}]}, "particles[0].model"),
        ({"name": "bad name/"}, "name"),
        ({"name": "x", "geometry": {"theta_start": -90, "theta_incr": 3}}, "geometry"),
        ({"name": "x", "detector": {"dqe": 1.5}}, "detector.dqe"),
        ({"num_stacks": 2}, "name: Field required"),
    ],
)
def test_bad_spec_fails_at_load_naming_the_field(tmp_path, doc, field):
    with pytest.raises(SpecError) as err:
        spec_from_dict(doc, str(tmp_path / "spec.yaml"))
    assert field in str(err.value) and "spec.yaml" in str(err.value)


def test_spec_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="broken.yaml: not valid YAML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="cannot read the spec"):
        load_spec(tmp_path / "absent.yaml")


def test_model_paths_are_relative_to_the_spec_file(tmp_path):
    (tmp_path / "models").mkdir()
    src = Path(simulation.__file__).parent / "data" / "6z6u.pdb.gz"
    (tmp_path / "models" / "ferritin.pdb.gz").write_bytes(src.read_bytes())
    path = tmp_path / "sim.yaml"
    path.write_text("name: rel\nparticles:\n  - model: models/ferritin.pdb.gz\n    count: 2\n")
    spec = load_spec(path)
    assert spec.particles[0].label == "ferritin"
    assert load_library(spec)["ferritin"].n_points == 32618


def test_unreadable_pdb_fails_at_run_start_and_leaves_nothing(tmp_path):
    (tmp_path / "junk.pdb").write_text("this is not a PDB file\n" * 3)
    spec = load_spec(_write(tmp_path / "s.yaml", "name: junk\nparticles:\n  - model: junk.pdb\n"))
    store = DataStore(str(tmp_path / "root"))
    with pytest.raises(ModelError, match=r"particles\[0\].model: .*junk.pdb"):
        simulate_stack(spec, 0, store)
    assert not (tmp_path / "root" / "simulation").exists()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_demo_spec_is_valid_and_written_once(tmp_path):
    from em_platform.simulation.cryoet.assembly import bead_count
    from em_platform.simulation.cryoet.examples import DEMO_SPEC_NAME, write_demo_spec

    path = write_demo_spec(tmp_path)
    spec = load_spec(path)
    assert spec.name == DEMO_SPEC_NAME and spec.movies.frames == 5 and bead_count(spec) == 13
    assert write_demo_spec(tmp_path) is None  # never overwritten (a user may have edited it)
