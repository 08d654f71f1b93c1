"""The RELION 5 project export, read back with the `starfile` package: every STAR file's blocks, columns and
values, the links (relative, resolving to the session's files), the job folders as RELION 5 lays them out
(3dem/relion src/pipeline_jobs.cpp, src/pipeliner.cpp), the pipeline's Import → MotionCorr → CtfFind graph,
the re-export that replaces an earlier one, and the refusals; and the project as the CCP-EM pipeliner (an
independent implementation of RELION 5's project folder) opens it and goes on with it."""

from __future__ import annotations

import os
import re

import mrcfile
import numpy as np
import pytest
import starfile

from em_platform.cryo import relion_project as rp
from em_platform.cryo.relion_project import Optics, write_relion_project

OPTICS = Optics(
    pixel_A=1.06, voltage_kV=300.0, cs_mm=2.7, amplitude_contrast=0.1, dose_per_frame_e_per_A2=1.25
)

# Each job type's options in RELION 5 (RelionJob::initialise*Job, the single-particle ones, and other_args)
RELION_OPTIONS = {
    "relion.import.movies": {
        "do_raw", "fn_in_raw", "is_multiframe", "optics_group_name", "fn_mtf", "angpix", "kV", "Cs", "Q0",
        "beamtilt_x", "beamtilt_y", "do_other", "fn_in_other", "node_type", "optics_group_particles", "other_args",
    },
    "relion.motioncorr.own": {
        "input_star_mics", "first_frame_sum", "last_frame_sum", "eer_grouping", "do_float16", "bfactor", "patch_x",
        "patch_y", "group_frames", "bin_factor", "fn_gain_ref", "gain_rot", "gain_flip", "do_own_motioncor",
        "fn_motioncor2_exe", "fn_defect", "gpu_ids", "other_motioncor2_args", "do_dose_weighting", "do_save_noDW",
        "dose_per_frame", "pre_exposure", "do_save_ps", "group_for_ps", "other_args",
    },
    "relion.ctffind.ctffind4": {
        "input_star_mics", "use_noDW", "do_phaseshift", "phase_min", "phase_max", "phase_step", "dast",
        "use_given_ps", "fn_ctffind_exe", "slow_search", "box", "resmin", "resmax", "dfmin", "dfmax", "dfstep",
        "ctf_win", "other_args",
    },
}  # fmt: skip


def _exposure(folder, i, ice=0.02):
    movie = folder / "movies" / f"FoilHole_{i}_Data_7.{i}.tiff"  # a dot in the stem: RELION's name changes it
    movie.parent.mkdir(parents=True, exist_ok=True)
    movie.write_bytes(b"II*\0" + bytes([i]) * 32)
    micrograph = folder / "motioncorr" / f"mic_{i}.mrc"
    micrograph.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(micrograph) as m:
        m.set_data(np.full((8, 12), i, dtype=np.float32))
        m.voxel_size = 1.06
    return {
        "movie": str(movie),
        "micrograph": str(micrograph),
        "total_motion_a": 10.0 + i,
        "early_motion_a": 3.0 + i,
        "late_motion_a": 7.0,
        "defocus_u_a": 15000.0 + 100 * i,
        "defocus_v_a": 14000.0 + 100 * i,
        "defocus_angle_deg": 30.0 + i,
        "astigmatism_a": 1000.0,
        "ctf_figure_of_merit": 0.1 + 0.01 * i,
        "ctf_fit_resolution_a": 3.5 + i,
        "ice_ring_density": ice + i,
    }


@pytest.fixture
def session(tmp_path):
    return [_exposure(tmp_path / "session", i) for i in range(3)]


def _files(root):
    """Every file and link under root (not following links), relative."""
    out = set()
    for folder, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            out.add(os.path.relpath(os.path.join(folder, name), root))
    return out


def test_the_folder_is_laid_out_as_relion_5_leaves_a_project(tmp_path, session):
    project = tmp_path / "relion"
    assert write_relion_project(project, session, OPTICS) == project / "default_pipeline.star"
    movies = [f"FoilHole_{i}_Data_7.{i}.tiff" for i in range(3)]
    mics = [f"FoilHole_{i}_Data_7_{i}.mrc" for i in range(3)]  # relion_run_motioncorr's names
    job_files = {
        "job.star",
        "note.txt",
        "job_pipeline.star",
        "default_pipeline.star",
        "RELION_JOB_EXIT_SUCCESS",
    }
    expected = (
        {"default_pipeline.star", ".gui_projectdir"}
        | {f"Movies/{m}" for m in movies}
        | {f"Import/job001/{f}" for f in job_files | {"movies.star"}}
        | {f"MotionCorr/job002/{f}" for f in job_files | {"corrected_micrographs.star", "logfile.pdf"}}
        | {f"MotionCorr/job002/Movies/{m}" for m in mics}
        | {f"CtfFind/job003/{f}" for f in job_files | {"micrographs_ctf.star", "logfile.pdf"}}
        | {
            ".Nodes/MicrographMovieGroupMetadata/Import/job001/movies.star",
            ".Nodes/MicrographGroupMetadata/MotionCorr/job002/corrected_micrographs.star",
            ".Nodes/LogFile/MotionCorr/job002/logfile.pdf",
            ".Nodes/MicrographGroupMetadata/CtfFind/job003/micrographs_ctf.star",
            ".Nodes/LogFile/CtfFind/job003/logfile.pdf",
        }
    )
    assert _files(project) == expected
    for job in ("Import/job001", "MotionCorr/job002", "CtfFind/job003"):
        assert (project / job / "RELION_JOB_EXIT_SUCCESS").stat().st_size == 0  # the pipeline_control marker
        note = (project / job / "note.txt").read_text()
        assert note.startswith(f"\n ++++ Exported by em_platform: {job}/\n")
    assert set(os.listdir(tmp_path)) == {"session", "relion"}  # the folder it was built in is gone


def test_the_pipeline_connects_import_motioncorr_and_ctffind(tmp_path, session):
    pipeline = write_relion_project(tmp_path / "relion", session, OPTICS)
    text = pipeline.read_text()
    # RELION reads the node labels as RELION 4's without the version tag before the tables
    assert re.findall(r"# version (\d+)\n\ndata_(\w+)", text) == [
        ("50001", b)
        for b in (
            "pipeline_general",
            "pipeline_processes",
            "pipeline_nodes",
            "pipeline_input_edges",
            "pipeline_output_edges",
        )
    ]
    blocks = starfile.read(pipeline, always_dict=True)
    assert blocks["pipeline_general"] == {"rlnPipeLineJobCounter": 4}
    processes = blocks["pipeline_processes"]
    assert list(processes.columns) == [
        "rlnPipeLineProcessName",
        "rlnPipeLineProcessAlias",
        "rlnPipeLineProcessTypeLabel",
        "rlnPipeLineProcessStatusLabel",
    ]
    assert processes.values.tolist() == [
        ["Import/job001/", "None", "relion.import.movies", "Succeeded"],
        ["MotionCorr/job002/", "None", "relion.motioncorr.own", "Succeeded"],
        ["CtfFind/job003/", "None", "relion.ctffind.ctffind4", "Succeeded"],
    ]
    nodes = blocks["pipeline_nodes"]
    assert list(nodes.columns) == [
        "rlnPipeLineNodeName",
        "rlnPipeLineNodeTypeLabel",
        "rlnPipeLineNodeTypeLabelDepth",
    ]
    assert nodes.values.tolist() == [
        ["Import/job001/movies.star", "MicrographMovieGroupMetadata.star.relion", 1],
        ["MotionCorr/job002/corrected_micrographs.star", "MicrographGroupMetadata.star.relion.motioncorr", 1],
        ["MotionCorr/job002/logfile.pdf", "LogFile.pdf.relion.motioncorr", 1],
        ["CtfFind/job003/micrographs_ctf.star", "MicrographGroupMetadata.star.relion.ctf", 1],
        ["CtfFind/job003/logfile.pdf", "LogFile.pdf.relion.ctffind", 1],
    ]
    project = pipeline.parent
    for name, label in nodes[["rlnPipeLineNodeName", "rlnPipeLineNodeTypeLabel"]].values:
        assert (project / name).is_file()
        assert (project / ".Nodes" / label.split(".")[0] / name).is_file()  # the GUI's browser finds it
    inputs = blocks["pipeline_input_edges"]
    assert list(inputs.columns) == ["rlnPipeLineEdgeFromNode", "rlnPipeLineEdgeProcess"]
    assert inputs.values.tolist() == [
        ["Import/job001/movies.star", "MotionCorr/job002/"],
        ["MotionCorr/job002/corrected_micrographs.star", "CtfFind/job003/"],
    ]
    outputs = blocks["pipeline_output_edges"]
    assert list(outputs.columns) == ["rlnPipeLineEdgeProcess", "rlnPipeLineEdgeToNode"]
    assert outputs.values.tolist() == [
        ["Import/job001/", "Import/job001/movies.star"],
        ["MotionCorr/job002/", "MotionCorr/job002/corrected_micrographs.star"],
        ["MotionCorr/job002/", "MotionCorr/job002/logfile.pdf"],
        ["CtfFind/job003/", "CtfFind/job003/micrographs_ctf.star"],
        ["CtfFind/job003/", "CtfFind/job003/logfile.pdf"],
    ]

    # the job's own records of its launch: its mini-pipeline and the pipeline as it was then
    mini = starfile.read(project / "MotionCorr/job002/job_pipeline.star", always_dict=True)
    assert mini["pipeline_processes"].values.tolist() == [
        ["MotionCorr/job002/", "None", "relion.motioncorr.own", "Running"]
    ]
    assert mini["pipeline_input_edges"].values.tolist() == [
        ["Import/job001/movies.star", "MotionCorr/job002/"]
    ]
    then = starfile.read(project / "CtfFind/job003/default_pipeline.star", always_dict=True)
    assert then["pipeline_general"] == {"rlnPipeLineJobCounter": 4}
    assert then["pipeline_processes"]["rlnPipeLineProcessStatusLabel"].tolist() == [
        "Succeeded",
        "Succeeded",
        "Running",
    ]
    first = starfile.read(project / "Import/job001/job_pipeline.star", always_dict=True)
    assert "pipeline_input_edges" not in first  # RELION writes no empty table


def test_movies_micrographs_and_ctf_fits_read_back(tmp_path, session):
    project = write_relion_project(tmp_path / "relion", session, OPTICS).parent

    movies = starfile.read(project / "Import/job001/movies.star", always_dict=True)
    assert set(movies) == {"optics", "movies"}
    optics = movies["optics"]
    assert list(optics.columns) == [  # relion_import's: no micrograph pixel size for movies
        "rlnOpticsGroupName",
        "rlnOpticsGroup",
        "rlnMicrographOriginalPixelSize",
        "rlnVoltage",
        "rlnSphericalAberration",
        "rlnAmplitudeContrast",
    ]
    assert optics.iloc[0].tolist() == ["opticsGroup1", 1, 1.06, 300.0, 2.7, 0.1]
    assert list(movies["movies"].columns) == ["rlnMicrographMovieName", "rlnOpticsGroup"]
    names = movies["movies"]["rlnMicrographMovieName"].tolist()
    assert names == [f"Movies/FoilHole_{i}_Data_7.{i}.tiff" for i in range(3)]
    for name, e in zip(names, session, strict=True):
        link = project / name
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert (
            str(link.resolve()) == os.path.realpath(e["movie"])
            and link.read_bytes() == open(e["movie"], "rb").read()
        )

    corrected = starfile.read(project / "MotionCorr/job002/corrected_micrographs.star", always_dict=True)
    assert set(corrected) == {"optics", "micrographs"}
    assert list(corrected["optics"].columns) == list(optics.columns) + ["rlnMicrographPixelSize"]
    assert corrected["optics"]["rlnMicrographPixelSize"].tolist() == [1.06]
    mics = corrected["micrographs"]
    assert list(mics.columns) == [
        "rlnMicrographName",
        "rlnOpticsGroup",
        "rlnAccumMotionTotal",
        "rlnAccumMotionEarly",
        "rlnAccumMotionLate",
    ]
    assert mics["rlnMicrographName"].tolist() == [
        f"MotionCorr/job002/Movies/FoilHole_{i}_Data_7_{i}.mrc" for i in range(3)
    ]
    assert mics["rlnOpticsGroup"].tolist() == [1, 1, 1]
    assert mics["rlnAccumMotionTotal"].tolist() == pytest.approx([e["total_motion_a"] for e in session])
    assert mics["rlnAccumMotionEarly"].tolist() == pytest.approx([e["early_motion_a"] for e in session])
    assert mics["rlnAccumMotionLate"].tolist() == pytest.approx([e["late_motion_a"] for e in session])
    for i, (name, e) in enumerate(zip(mics["rlnMicrographName"], session, strict=True)):
        link = project / name
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert str(link.resolve()) == os.path.realpath(e["micrograph"])
        with mrcfile.open(link) as m:  # what AutoPick and Extract will read
            assert np.all(m.data == i) and float(m.voxel_size.x) == pytest.approx(1.06)

    ctf = starfile.read(project / "CtfFind/job003/micrographs_ctf.star", always_dict=True)
    assert set(ctf) == {"optics", "micrographs"} and ctf["optics"].equals(corrected["optics"])
    fits = ctf["micrographs"]
    assert list(fits.columns) == [  # relion_run_ctffind's order; it carries no motion columns
        "rlnMicrographName",
        "rlnOpticsGroup",
        "rlnDefocusU",
        "rlnDefocusV",
        "rlnCtfAstigmatism",
        "rlnDefocusAngle",
        "rlnCtfFigureOfMerit",
        "rlnCtfMaxResolution",
        "rlnCtfIceRingDensity",
    ]
    assert fits["rlnMicrographName"].tolist() == mics["rlnMicrographName"].tolist()
    for column, key in (
        ("rlnDefocusU", "defocus_u_a"),
        ("rlnDefocusV", "defocus_v_a"),
        ("rlnCtfAstigmatism", "astigmatism_a"),
        ("rlnDefocusAngle", "defocus_angle_deg"),
        ("rlnCtfFigureOfMerit", "ctf_figure_of_merit"),
        ("rlnCtfMaxResolution", "ctf_fit_resolution_a"),
        ("rlnCtfIceRingDensity", "ice_ring_density"),
    ):
        assert fits[column].tolist() == pytest.approx([e[key] for e in session], abs=1e-6), column


def test_each_job_star_holds_relion_5_options_for_what_was_done(tmp_path, session):
    project = write_relion_project(tmp_path / "relion", session, OPTICS).parent
    expected = {
        "Import/job001": (
            "relion.import.movies",
            {
                "do_raw": "Yes",
                "fn_in_raw": "Movies/*.tiff",
                "is_multiframe": "Yes",
                "optics_group_name": "opticsGroup1",
                "angpix": "1.06",
                "kV": "300",
                "Cs": "2.7",
                "Q0": "0.1",
                "do_other": "No",
            },
        ),
        "MotionCorr/job002": (
            "relion.motioncorr.own",
            {
                "input_star_mics": "Import/job001/movies.star",
                "do_own_motioncor": "Yes",
                "bin_factor": "1",
                "dose_per_frame": "1.25",
                "do_dose_weighting": "Yes",
                "do_save_ps": "No",
            },
        ),
        "CtfFind/job003": (
            "relion.ctffind.ctffind4",
            {"input_star_mics": "MotionCorr/job002/corrected_micrographs.star", "use_given_ps": "No"},
        ),
    }
    for job, (label, values) in expected.items():
        text = (project / job / "job.star").read_text()
        assert text.count("# version 50001\n\ndata_") == 2
        blocks = starfile.read(project / job / "job.star", always_dict=True)
        assert blocks["job"] == {"rlnJobTypeLabel": label, "rlnJobIsContinue": 0, "rlnJobIsTomo": 0}
        table = blocks["joboptions_values"]
        assert list(table.columns) == ["rlnJobOptionVariable", "rlnJobOptionValue"]
        options = {k: "" if v is None or v != v else str(v) for k, v in table.values.tolist()}
        assert list(options) == sorted(options)  # a std::map's order, as RELION writes them
        assert set(options) <= RELION_OPTIONS[label], set(options) - RELION_OPTIONS[label]
        assert {k: options[k] for k in values} == values
    # a quoted value with spaces reads back whole, as RELION's own parser would read it
    assert '"Particle coordinates (*.box, *_pick.star)"' in (project / "Import/job001/job.star").read_text()


def test_the_logfiles_are_pdfs_whose_cross_reference_table_finds_each_object(tmp_path, session):
    project = write_relion_project(tmp_path / "relion", session, OPTICS).parent
    for log in ("MotionCorr/job002/logfile.pdf", "CtfFind/job003/logfile.pdf"):
        pdf = (project / log).read_bytes()
        assert pdf.startswith(b"%PDF-1.4\n") and pdf.endswith(b"%%EOF\n")
        start = int(re.search(rb"startxref\n(\d+)\n", pdf).group(1))
        assert pdf[start:].startswith(b"xref\n0 6\n")
        offsets = [int(o) for o in re.findall(rb"(\d{10}) 00000 n ", pdf[start:])]
        assert [pdf[o:].split(b"\n", 1)[0] for o in offsets] == [b"%d 0 obj" % i for i in range(1, 6)]
        length = int(re.search(rb"/Length (\d+)", pdf).group(1))
        stream = pdf.split(b"stream\n", 1)[1]
        assert stream[length:].startswith(b"\nendstream")
        assert log.split("/")[0].encode() in stream


def test_a_missing_ice_ring_density_leaves_the_column_out_and_no_dose_means_no_dose_weighting(tmp_path):
    exposures = [_exposure(tmp_path / "session", i) for i in range(3)]
    exposures[1]["ice_ring_density"] = None
    project = write_relion_project(tmp_path / "relion", exposures, Optics(1.06, 200.0)).parent
    fits = starfile.read(project / "CtfFind/job003/micrographs_ctf.star", always_dict=True)["micrographs"]
    assert "rlnCtfIceRingDensity" not in fits.columns and len(fits) == 3
    options = dict(
        starfile.read(project / "MotionCorr/job002/job.star", always_dict=True)[
            "joboptions_values"
        ].values.tolist()
    )
    assert options["do_dose_weighting"] == "No"
    optics = starfile.read(project / "Import/job001/movies.star", always_dict=True)["optics"]
    assert optics["rlnVoltage"].tolist() == [200.0] and optics["rlnAmplitudeContrast"].tolist() == [0.07]


def test_a_re_export_replaces_the_earlier_one(tmp_path, session):
    project = tmp_path / "relion"
    write_relion_project(project, session, OPTICS)
    (project / "MotionCorr/job002/leftover.txt").write_text("from the earlier export")
    write_relion_project(project, session[1:], OPTICS)
    names = starfile.read(project / "Import/job001/movies.star", always_dict=True)["movies"]
    assert names["rlnMicrographMovieName"].tolist() == [
        f"Movies/FoilHole_{i}_Data_7.{i}.tiff" for i in (1, 2)
    ]
    assert not (project / "MotionCorr/job002/leftover.txt").exists()
    assert sorted(os.listdir(project / "Movies")) == [f"FoilHole_{i}_Data_7.{i}.tiff" for i in (1, 2)]
    assert set(os.listdir(tmp_path)) == {"session", "relion"}  # neither the new build's nor the old's folder


def test_a_failed_re_export_leaves_the_earlier_one_intact(tmp_path, session, monkeypatch):
    project = tmp_path / "relion"
    write_relion_project(project, session, OPTICS)
    before = {f: (project / f).read_bytes() for f in _files(project) if (project / f).is_file()}

    gone = dict(session[0], micrograph=str(tmp_path / "session" / "gone.mrc"))
    with pytest.raises(FileNotFoundError, match="gone.mrc"):
        write_relion_project(project, [gone, *session[1:]], OPTICS)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(rp, "write_star", broken)  # fails half way through the build
    with pytest.raises(OSError, match="disk full"):
        write_relion_project(project, session, OPTICS)

    assert {f: (project / f).read_bytes() for f in _files(project) if (project / f).is_file()} == before
    assert set(os.listdir(tmp_path)) == {"session", "relion"}


def test_a_project_relion_went_on_with_or_a_foreign_folder_is_not_replaced(tmp_path, session):
    project = tmp_path / "relion"
    write_relion_project(project, session, OPTICS)
    pipeline = project / "default_pipeline.star"
    text = pipeline.read_text()
    # the user ran AutoPick: RELION adds the process and counts on
    pipeline.write_text(
        text.replace(
            "_rlnPipeLineJobCounter                       4", "_rlnPipeLineJobCounter                       5"
        ).replace(
            "CtfFind/job003/       None relion.ctffind.ctffind4  Succeeded \n",
            "CtfFind/job003/       None relion.ctffind.ctffind4  Succeeded \n"
            "AutoPick/job004/       None relion.autopick.log  Succeeded \n",
        )
    )
    with pytest.raises(ValueError, match="AutoPick/job004/"):
        write_relion_project(project, session, OPTICS)
    assert "AutoPick/job004/" in pipeline.read_text()

    (project / "Import/job001/note.txt").write_text(
        "\n ++++ Executing new job on Mon\n"
    )  # RELION's own import
    pipeline.write_text(text)
    with pytest.raises(ValueError, match="did not write"):
        write_relion_project(project, session, OPTICS)

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="refusing to replace"):
        write_relion_project(other, session, OPTICS)
    assert (other / "notes.txt").read_text() == "keep"

    empty = tmp_path / "empty"
    empty.mkdir()
    write_relion_project(empty, session, OPTICS)  # an empty folder is fine
    assert (empty / "default_pipeline.star").is_file()


def test_refusals(tmp_path, session):
    with pytest.raises(ValueError, match="no accepted exposure to export"):
        write_relion_project(tmp_path / "relion", [], OPTICS)

    twin = dict(session[0], movie=str(tmp_path / "elsewhere" / os.path.basename(session[0]["movie"])))
    os.makedirs(tmp_path / "elsewhere")
    open(twin["movie"], "wb").close()
    with pytest.raises(ValueError, match="same file name") as err:
        write_relion_project(tmp_path / "relion", [session[0], twin], OPTICS)
    assert session[0]["movie"] in str(err.value) and twin["movie"] in str(err.value)

    # different files, one micrograph name: RELION turns the stem's dots into underscores
    a, b = tmp_path / "session" / "movies" / "sq.1.tiff", tmp_path / "session" / "movies" / "sq_1.tiff"
    a.touch()
    b.touch()
    with pytest.raises(ValueError, match="would both be motion corrected") as err:
        write_relion_project(
            tmp_path / "relion", [dict(session[0], movie=str(a)), dict(session[1], movie=str(b))], OPTICS
        )
    assert (
        str(a) in str(err.value)
        and str(b) in str(err.value)
        and "MotionCorr/job002/Movies/sq_1.mrc" in str(err.value)
    )

    spaced = tmp_path / "session" / "movies" / "a b.tiff"
    spaced.touch()
    with pytest.raises(ValueError, match="white space"):
        write_relion_project(tmp_path / "relion", [dict(session[0], movie=str(spaced))], OPTICS)

    with pytest.raises(ValueError, match="positive"):
        write_relion_project(tmp_path / "relion", session, Optics(0.0, 300.0))
    assert not (tmp_path / "relion").exists()

    # files inside the folder the export replaces would be deleted with it
    project = tmp_path / "relion"
    write_relion_project(project, session, OPTICS)
    inside = dict(session[0], micrograph=str(project / "mine.mrc"))
    (project / "mine.mrc").write_bytes(b"x")
    with pytest.raises(ValueError, match="inside"):
        write_relion_project(project, [inside], OPTICS)
    assert (project / "mine.mrc").read_bytes() == b"x"


# The CCP-EM pipeliner (ccpem-pipeliner, the engine of CCP-EM's Doppio) reads and writes RELION 5 project
# folders itself: an independent reader of the export, and a user's way to go on with it.
PIPELINER_NODES = {  # each job's output nodes and their types, as the pipeliner reads them
    "Import/job001/": [("Import/job001/movies.star", "MicrographMovieGroupMetadata.star.relion")],
    "MotionCorr/job002/": [
        ("MotionCorr/job002/corrected_micrographs.star", "MicrographGroupMetadata.star.relion.motioncorr"),
        ("MotionCorr/job002/logfile.pdf", "LogFile.pdf.relion.motioncorr"),
    ],
    "CtfFind/job003/": [
        ("CtfFind/job003/micrographs_ctf.star", "MicrographGroupMetadata.star.relion.ctf"),
        ("CtfFind/job003/logfile.pdf", "LogFile.pdf.relion.ctffind"),
    ],
}


@pytest.fixture
def pipeliner(tmp_path, monkeypatch):
    """The pipeliner, with fresh user settings: it writes its settings file under XDG_CONFIG_HOME (on import,
    the first time) and takes PIPELINER_* / RELION_* variables over it, so neither the developer's home nor
    a site's variables decide what it accepts."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for name in list(os.environ):
        if name.startswith(("PIPELINER_", "RELION_")):
            monkeypatch.delenv(name)
    module = pytest.importorskip(
        "pipeliner",
        reason="ccpem-pipeliner (the test extra) is not installed: the export is not read by an independent "
        "implementation of RELION 5's project folder",
        exc_type=ModuleNotFoundError,  # installed but broken fails the test
    )
    from pipeliner import user_settings

    monkeypatch.setattr(user_settings, "_settings", None)  # read again from the fresh settings
    return module


def _errors(results):
    return [str(r) for r in results if r.type == "error"]


def test_the_ccpem_pipeliner_reads_the_export_as_three_succeeded_jobs(
    tmp_path, session, pipeliner, monkeypatch
):
    from pipeliner.api.manage_project import PipelinerProject
    from pipeliner.data_structure import NODES_DIR
    from pipeliner.job_factory import read_job
    from pipeliner.node_factory import create_node
    from pipeliner.project_graph import ProjectGraph

    project = write_relion_project(tmp_path / "relion", session, OPTICS).parent
    monkeypatch.chdir(project)  # the pipeliner works on the project in the working directory
    assert PipelinerProject().pipeline_name == "default"  # it opens the folder as a project RELION made

    with ProjectGraph() as pipeline:  # read-only, as Doppio lists a project
        # RELION 5's node labels: a pipeline it took for RELION 4's would have its node types converted
        assert pipeline.validate_pipeline_file()[1] == "ccpem-pipeliner"
        assert pipeline.job_counter == 4
        processes = pipeline.process_list
        assert [(p.name, p.type, p.status) for p in processes] == [
            ("Import/job001/", "relion.import.movies", "Succeeded"),
            ("MotionCorr/job002/", "relion.motioncorr.own", "Succeeded"),
            ("CtfFind/job003/", "relion.ctffind.ctffind4", "Succeeded"),
        ]
        assert {p.name: [(n.name, n.type) for n in p.output_nodes] for p in processes} == PIPELINER_NODES
        assert {p.name: [n.name for n in p.input_nodes] for p in processes} == {
            "Import/job001/": [],
            "MotionCorr/job002/": ["Import/job001/movies.star"],
            "CtfFind/job003/": ["MotionCorr/job002/corrected_micrographs.star"],
        }
        for p in processes:
            assert all(n.output_from_process is p for n in p.output_nodes)
        assert {p.name: [c.name for c in pipeline.find_immediate_child_processes(p)] for p in processes} == {
            "Import/job001/": ["MotionCorr/job002/"],
            "MotionCorr/job002/": ["CtfFind/job003/"],
            "CtfFind/job003/": [],
        }
        for node in pipeline.node_list:
            assert os.path.isfile(node.name), node.name
            # where the pipeliner itself touches a finished job's node for RELION's file browser
            assert os.path.isfile(os.path.join(NODES_DIR, node.toplevel_type, pipeline.get_node_name(node)))
            # made again with the file read (gemmi's STAR parser): a file it cannot parse gets format XstarX
            assert create_node(node.name, node.toplevel_type, node.kwds).type == node.type

        for p in processes:
            # the job as the pipeliner rebuilds it from job.star: its own definition of the job type gives the
            # same output nodes and inputs, and the inputs are there
            job = read_job(p.name + "job.star")
            assert job.PROCESS_NAME == p.type
            job.output_dir = p.name
            job.create_output_nodes()
            assert [(n.name, n.type) for n in job.output_nodes] == PIPELINER_NODES[p.name]
            job.create_input_nodes()
            assert [n.name for n in job.input_nodes] == [n.name for n in p.input_nodes]
            assert _errors(job.validate_joboptions()) == [], p.name
            assert _errors(job.validate_input_files()) == [], p.name
        # what it reads of the jobs' options and results
        import_job, motioncorr, ctffind = (read_job(p.name + "job.star") for p in processes)
        optics = {k: import_job.joboptions[k].get_number() for k in ("angpix", "kV", "Cs", "Q0")}
        assert optics == {"angpix": 1.06, "kV": 300, "Cs": 2.7, "Q0": 0.1}
        found = [(r.type, r.message) for r in import_job.validate_joboptions()]
        assert found == [("info", "3 files found")]  # it globbed Movies/*.tiff through the links
        assert motioncorr.joboptions["dose_per_frame"].get_number() == 1.25
        motioncorr.output_dir, ctffind.output_dir = "MotionCorr/job002/", "CtfFind/job003/"
        assert motioncorr.gather_metadata()["MicrographCount"] == 3
        fits = ctffind.gather_metadata()  # from micrographs_ctf.star's columns
        assert fits["MicrographCount"] == 3
        assert (fits["DefocusMin"], fits["DefocusMax"]) == pytest.approx((14500, 14700))  # (U + V) / 2
        assert (fits["FomMin"], fits["FomMax"]) == pytest.approx((0.10, 0.12))
    assert not os.path.exists(".relion_lock")  # RELION would wait for a lock left behind


def test_a_new_autopick_job_in_the_ccpem_pipeliner_takes_ctffind_s_micrographs(
    tmp_path, session, pipeliner, monkeypatch
):
    import subprocess

    from pipeliner.api.manage_project import PipelinerProject
    from pipeliner.job_factory import new_job_of_type
    from pipeliner.project_graph import ProjectGraph

    project = write_relion_project(tmp_path / "relion", session, OPTICS).parent
    monkeypatch.chdir(project)

    def no_program(*args, **kwargs):
        raise AssertionError(f"an external program was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_program)  # validating and scheduling a job runs nothing
    monkeypatch.setattr(os, "system", no_program)

    job = new_job_of_type("relion.autopick.log")  # Laplacian-of-Gaussian picking: no template, no model
    job.joboptions["fn_input_autopick"].value = "CtfFind/job003/micrographs_ctf.star"
    assert _errors(job.validate_joboptions()) == []
    assert _errors(job.validate_input_files()) == []
    job.create_input_nodes()  # the node made from the file the user picked, the file read
    assert [(n.name, n.type) for n in job.input_nodes] == [
        ("CtfFind/job003/micrographs_ctf.star", "MicrographGroupMetadata.star.relion")
    ]
    missing = new_job_of_type("relion.autopick.log")  # the check can fail
    missing.joboptions["fn_input_autopick"].value = "CtfFind/job003/micrographs.star"
    assert len(_errors(missing.validate_input_files())) == 1

    # schedule it as a Doppio user would: validated, given the next job number, wired into the pipeline
    scheduled = PipelinerProject().schedule_job(
        {
            "_rlnJobTypeLabel": "relion.autopick.log",
            "fn_input_autopick": "CtfFind/job003/micrographs_ctf.star",
            "log_diam_min": 150,
            "log_diam_max": 180,
        }
    )
    assert scheduled.output_dir == "AutoPick/job004/"
    assert (project / "AutoPick/job004/job.star").is_file()
    assert not (project / ".relion_lock").exists()
    with ProjectGraph() as pipeline:
        assert pipeline.job_counter == 5
        assert [(p.name, p.status) for p in pipeline.process_list] == [
            ("Import/job001/", "Succeeded"),
            ("MotionCorr/job002/", "Succeeded"),
            ("CtfFind/job003/", "Succeeded"),
            ("AutoPick/job004/", "Scheduled"),
        ]
        autopick = pipeline.find_process("AutoPick/job004/")
        assert autopick.type == "relion.autopick.log"
        # the input is CtfFind's own node, type and all, not a new one
        assert [(n.name, n.type, n.output_from_process.name) for n in autopick.input_nodes] == [
            (
                "CtfFind/job003/micrographs_ctf.star",
                "MicrographGroupMetadata.star.relion.ctf",
                "CtfFind/job003/",
            )
        ]
        ctffind = pipeline.find_process("CtfFind/job003/")
        assert [c.name for c in pipeline.find_immediate_child_processes(ctffind)] == ["AutoPick/job004/"]
        assert {p.name: [(n.name, n.type) for n in p.output_nodes] for p in pipeline.process_list[:3]} == (
            PIPELINER_NODES
        )  # the pipeliner wrote the pipeline back with the export's jobs as they were

    # the project has gone on: a re-export must not replace it
    with pytest.raises(ValueError, match="AutoPick/job004/"):
        write_relion_project(project, session, OPTICS)
    assert (project / "AutoPick/job004/job.star").is_file()
