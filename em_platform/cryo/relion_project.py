"""A live single-particle session's accepted exposures as a RELION 5 project folder, so the user opens it in
RELION and goes on with AutoPick / Extract as if RELION had run Import → MotionCorr → CtfFind itself.

The folder is laid out as RELION 5 leaves a project after those three jobs::

    default_pipeline.star   .gui_projectdir   .Nodes/<node type>/<job>/<file>   Movies/<movie>
    Import/job001/      movies.star
    MotionCorr/job002/  corrected_micrographs.star  logfile.pdf  Movies/<movie name>.mrc
    CtfFind/job003/     micrographs_ctf.star  logfile.pdf

and each job folder also holds ``job.star``, ``note.txt``, ``job_pipeline.star``, the copy of
``default_pipeline.star`` RELION makes when it launches the job, and ``RELION_JOB_EXIT_SUCCESS``.
``Movies/<movie>`` are symbolic links to the session's movies (RELION imports files inside the project only,
so its users link the movies in) and ``MotionCorr/job002/Movies/<movie name>.mrc`` link to our
motion-corrected micrographs, named as relion_run_motioncorr names them; links are relative where a relative
path exists, so the project and the data can move together.

Where the format comes from (3dem/relion, RELION 5.0): ``src/pipeline_jobs.h`` (process and node type labels,
job folder names), ``src/pipeline_jobs.cpp`` (each job's options, defaults and output nodes;
``RelionJob::write`` is ``job.star``), ``src/pipeliner.cpp`` (``PipeLine::write/read/addJob/runJob``: the
pipeline's blocks, its ``# version 50001`` tag without which RELION reads node labels as RELION 4's, the
job's pipeline copies, ``.Nodes``), ``src/metadata_table.cpp`` (STAR layout), ``src/apps/import.cpp``
(``movies.star``), ``src/motioncorr_runner.cpp`` and ``src/ctffind_runner.cpp`` (their STAR files' columns,
micrograph names), ``src/gui_mainwindow.cpp`` (``.gui_projectdir``); checked against a project RELION 5.0
wrote (github.com/Conecsion/sppractice).

What RELION would have written and this export has not, because the results database does not hold it:
``_rlnMicrographMetadata`` (a STAR file of per-frame shifts: Bayesian polishing needs a new MotionCorr job),
power spectra (``_rlnCtfPowerSpectrum``) and CTF images (``_rlnCtfImage``), the jobs' run.out/run.err, and
logfile.pdf's plots (ours is one page that says where the values are). ``job.star`` records what describes
the import and what is known of our processing; the rest keeps RELION's defaults, and the running options
(queue, MPI, threads, executables) are left for RELION to fill in with the site's own. Do not *continue*
MotionCorr/job002 in RELION: it would write its micrographs through the links onto ours.

Two movies of the same file name (or whose micrograph names would be the same) are refused: RELION's
``Movies/`` holds one file per name. A re-export builds the project in a hidden sibling folder and renames it
into place, so a failure leaves the earlier export as it was; it replaces only an earlier export that RELION
has not gone on with (a folder whose pipeline has jobs of the user's is refused, not deleted).
"""

from __future__ import annotations

import os
import secrets
import shutil
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from em_platform.cryo.optics import Microscope
from em_platform.cryo.relion_star import (
    OPTICS_GROUP,
    exposures_ctf,
    exposures_motion,
    optics_block,
    write_star,
)

VERSION = 50001  # RELION 5's STAR version tag

IMPORT, MOTIONCORR, CTFFIND = "Import/job001/", "MotionCorr/job002/", "CtfFind/job003/"
MOVIES_STAR = IMPORT + "movies.star"
CORRECTED_STAR = MOTIONCORR + "corrected_micrographs.star"
CTF_STAR = CTFFIND + "micrographs_ctf.star"
MOTIONCORR_LOG = MOTIONCORR + "logfile.pdf"
CTFFIND_LOG = CTFFIND + "logfile.pdf"
MOVIES = "Movies"  # the project's links to the movies
JOB_COUNTER = 4  # RELION numbers its next job job004
EXPORT_NOTE = "Exported by em_platform"  # how a re-export tells its own earlier export from a user's project


@dataclass(frozen=True)
class Optics:
    pixel_A: float  # the movies' pixel size (Å)
    voltage_kV: float
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.07
    dose_per_frame_e_per_A2: float | None = None


@dataclass(frozen=True)
class _Job:
    process: str
    type_label: str
    inputs: tuple[tuple[str, str], ...]  # (node, the type the job's input option asks for)
    outputs: tuple[tuple[str, str], ...]  # (node, its type)


JOBS = (
    _Job(IMPORT, "relion.import.movies", (), ((MOVIES_STAR, "MicrographMovieGroupMetadata.star.relion"),)),
    _Job(
        MOTIONCORR,
        "relion.motioncorr.own",  # our own implementation stands in for RELION's own
        ((MOVIES_STAR, "MicrographMovieGroupMetadata.star.relion"),),
        (
            (CORRECTED_STAR, "MicrographGroupMetadata.star.relion.motioncorr"),
            (MOTIONCORR_LOG, "LogFile.pdf.relion.motioncorr"),
        ),
    ),
    _Job(
        CTFFIND,
        "relion.ctffind.ctffind4",
        ((CORRECTED_STAR, "MicrographGroupMetadata.star.relion"),),
        ((CTF_STAR, "MicrographGroupMetadata.star.relion.ctf"), (CTFFIND_LOG, "LogFile.pdf.relion.ctffind")),
    ),
)


@dataclass(frozen=True)
class _Exposure:
    movie: Path  # absolute
    micrograph: Path
    movie_name: str  # as the project names it: Movies/<file name>
    micrograph_name: str  # MotionCorr/job002/Movies/<movie name>.mrc
    row: Mapping[str, Any]


def micrograph_name(movie_name: str) -> str:
    """relion_run_motioncorr's micrograph of a movie: the movie's path without its extension, its other dots
    as underscores, under the job's folder."""
    root = movie_name.rsplit(".", 1)[0] if "." in movie_name else movie_name
    return f"{MOTIONCORR}{root.replace('.', '_')}.mrc"


def write_relion_project(project: Path, exposures: Sequence[Mapping[str, Any]], optics: Optics) -> Path:
    """Write (or replace) the RELION 5 project folder ``project``; returns project / "default_pipeline.star"."""
    project = Path(os.path.abspath(project))
    if not optics.pixel_A > 0 or not optics.voltage_kV > 0:
        raise ValueError(f"the pixel size and the voltage must be positive: {optics}")
    items = _exposures(exposures, project)
    _check_replaceable(project)
    project.parent.mkdir(parents=True, exist_ok=True)
    building = project.with_name(f".{project.name}.{secrets.token_hex(4)}.tmp")
    building.mkdir()  # a sibling: the relative links made for the project resolve the same from here
    try:
        _build(building, Path(os.path.realpath(project.parent)) / project.name, items, optics)
        _move_into_place(building, project)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return project / "default_pipeline.star"


def _exposures(exposures: Sequence[Mapping[str, Any]], project: Path) -> list[_Exposure]:
    if not exposures:
        raise ValueError("no accepted exposure to export")
    items: list[_Exposure] = []
    by_movie: dict[str, Path] = {}
    by_micrograph: dict[str, Path] = {}
    missing = []
    inside = str(Path(os.path.realpath(project))) + os.sep
    for e in exposures:
        movie, mic = Path(os.path.abspath(e["movie"])), Path(os.path.abspath(e["micrograph"]))
        if any(c.isspace() for c in movie.name):
            raise ValueError(f"RELION's STAR files cannot name a movie with white space: {movie}")
        if movie.name in by_movie:
            raise ValueError(
                f"movies {by_movie[movie.name]} and {movie} have the same file name: the project's {MOVIES}/ "
                "holds one file per name"
            )
        name = micrograph_name(f"{MOVIES}/{movie.name}")
        if name in by_micrograph:
            raise ValueError(
                f"movies {by_micrograph[name]} and {movie} would both be motion corrected into {name}"
            )
        by_movie[movie.name] = by_micrograph[name] = movie
        for f in (movie, mic):
            if not f.exists():
                missing.append(str(f))
            elif os.path.realpath(f).startswith(inside):
                raise ValueError(f"{f} is inside {project}, which the export replaces")
        items.append(_Exposure(movie, mic, f"{MOVIES}/{movie.name}", name, e))
    if missing:
        raise FileNotFoundError(f"{len(missing)} files to export are missing: {', '.join(missing[:5])}")
    return items


def _check_replaceable(project: Path) -> None:
    """Only an empty folder or an earlier export RELION has not gone on with may be replaced."""
    if not os.path.lexists(project):
        return
    if project.is_symlink() or not project.is_dir():
        raise ValueError(f"{project} exists and is not a folder")
    if not any(project.iterdir()):
        return
    import starfile

    try:
        blocks = starfile.read(project / "default_pipeline.star", always_dict=True)
        counter = int(blocks["pipeline_general"]["rlnPipeLineJobCounter"])
        processes = list(blocks["pipeline_processes"]["rlnPipeLineProcessName"])
        ours = (project / IMPORT / "note.txt").read_text().strip().startswith("++++ " + EXPORT_NOTE)
    except Exception as exc:
        raise ValueError(
            f"{project} is not empty and holds no earlier export; refusing to replace it"
        ) from exc
    if not ours:
        raise ValueError(f"{project} is a RELION project this module did not write; refusing to replace it")
    if counter != JOB_COUNTER or processes != [j.process for j in JOBS]:
        raise ValueError(
            f"{project} has RELION jobs beyond the export ({', '.join(processes)}; next job {counter}): "
            "replacing it would delete them; export to another folder"
        )


def _move_into_place(building: Path, project: Path) -> None:
    if not os.path.lexists(project):
        os.rename(building, project)
        return
    old = project.with_name(f".{project.name}.{secrets.token_hex(4)}.old")
    os.rename(project, old)
    try:
        os.rename(building, project)
    except BaseException:
        os.rename(old, project)
        raise
    shutil.rmtree(old, ignore_errors=True)  # the new export is in place; a leftover is only clutter


def _build(root: Path, final: Path, items: Sequence[_Exposure], optics: Optics) -> None:
    """The project in ``root``; ``final`` is where it will be (physical path), which the links are relative to."""
    for job in JOBS:
        (root / job.process).mkdir(parents=True)
    for it in items:
        _link(root, final, it.movie_name, it.movie)
        _link(root, final, it.micrograph_name, it.micrograph)

    group = optics_block(
        optics.pixel_A, Microscope(optics.voltage_kV, optics.cs_mm, optics.amplitude_contrast)
    )
    movie_group = {k: v for k, v in group.items() if k != "rlnMicrographPixelSize"}  # relion_import's
    _write_movies(root / MOVIES_STAR, movie_group, [it.movie_name for it in items])
    base = [{"rlnMicrographName": it.micrograph_name, "rlnOpticsGroup": 1} for it in items]
    rows = [it.row for it in items]
    write_star(root / CORRECTED_STAR, group, exposures_motion(base, rows))
    write_star(root / CTF_STAR, group, exposures_ctf(base, rows))  # RELION's CtfFind: no motion columns

    n = len(items)
    notes = (
        f"{n} movies linked into {MOVIES}/ from the session; no relion_import ran.",
        f"{n} micrographs motion corrected by em_platform's own implementation; Movies/ links to them. "
        "No rlnMicrographMetadata (per-frame shifts): Bayesian polishing needs a new MotionCorr job. "
        "Do not continue this job: RELION would write its micrographs through the links.",
        f"{n} CTF fits by em_platform (CTFFIND 4's conventions); no power spectra or CTF images.",
    )
    options = _import_options(optics, items), _motioncorr_options(optics), _ctffind_options()
    for i, (job, note, opts) in enumerate(zip(JOBS, notes, options, strict=True)):
        folder = root / job.process
        (folder / "job.star").write_text(_job_star(job.type_label, opts))
        (folder / "note.txt").write_text(f"\n ++++ {EXPORT_NOTE}: {job.process}\n ++++ {note}\n ++++ \n")
        # RELION's own records of the launch: the job's mini-pipeline and the pipeline as it was then
        (folder / "job_pipeline.star").write_text(_pipeline([job], ["Running"], 2))
        (folder / "default_pipeline.star").write_text(
            _pipeline(JOBS[: i + 1], ["Succeeded"] * i + ["Running"], i + 2)
        )
        (folder / "RELION_JOB_EXIT_SUCCESS").touch()
    (root / MOTIONCORR_LOG).write_bytes(
        _pdf([f"{MOTIONCORR}: motion corrected by em_platform", notes[1], f"Motion (A): {CORRECTED_STAR}"])
    )
    (root / CTFFIND_LOG).write_bytes(
        _pdf([f"{CTFFIND}: CTF fitted by em_platform", notes[2], f"Fits: {CTF_STAR}"])
    )

    (root / "default_pipeline.star").write_text(_pipeline(JOBS, ["Succeeded"] * len(JOBS), JOB_COUNTER))
    (root / ".gui_projectdir").touch()  # the GUI asks before it opens a folder without it
    for job in JOBS:  # the GUI's file browser lists a job's outputs by type from these
        for name, label in job.outputs:
            node = root / ".Nodes" / label.split(".")[0] / name
            node.parent.mkdir(parents=True, exist_ok=True)
            node.touch()


def _link(root: Path, final: Path, name: str, target: Path) -> None:
    link = root / name
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        to = os.path.relpath(target, (final / name).parent)
    except ValueError:  # another drive: no relative path
        to = str(target)
    os.symlink(to, link)


def _write_movies(path: Path, optics: Mapping[str, list], movie_names: Sequence[str]) -> None:
    """``movies.star`` as relion_import writes it: ``data_optics`` and ``data_movies``."""
    import pandas as pd
    import starfile

    movies = pd.DataFrame({"rlnMicrographMovieName": list(movie_names), "rlnOpticsGroup": 1})
    starfile.write({"optics": pd.DataFrame(optics), "movies": movies}, path, overwrite=True)


def _num(x: float) -> str:
    return f"{float(x):.10g}"


def _import_options(optics: Optics, items: Sequence[_Exposure]) -> dict[str, str]:
    suffixes = {it.movie.suffix for it in items}
    return {
        "do_raw": "Yes",
        "fn_in_raw": f"{MOVIES}/*{suffixes.pop() if len(suffixes) == 1 else ''}",
        "is_multiframe": "Yes",
        "optics_group_name": OPTICS_GROUP,
        "fn_mtf": "",
        "angpix": _num(optics.pixel_A),
        "kV": _num(optics.voltage_kV),
        "Cs": _num(optics.cs_mm),
        "Q0": _num(optics.amplitude_contrast),
        "beamtilt_x": "0",
        "beamtilt_y": "0",
        "do_other": "No",
        "fn_in_other": "ref.mrc",
        "node_type": "Particle coordinates (*.box, *_pick.star)",
        "optics_group_particles": "",
        "other_args": "",
    }


def _motioncorr_options(optics: Optics) -> dict[str, str]:
    dose = optics.dose_per_frame_e_per_A2
    return {
        "input_star_mics": MOVIES_STAR,
        "first_frame_sum": "1",
        "last_frame_sum": "-1",
        "eer_grouping": "32",
        "do_float16": "No",
        "bfactor": "150",
        "patch_x": "1",
        "patch_y": "1",
        "group_frames": "1",
        "bin_factor": "1",  # the micrographs keep the movies' pixel size
        "fn_gain_ref": "",
        "gain_rot": "No rotation (0)",
        "gain_flip": "No flipping (0)",
        "do_own_motioncor": "Yes",
        "fn_defect": "",
        "gpu_ids": "0",
        "other_motioncor2_args": "",
        "do_dose_weighting": "Yes" if dose else "No",  # our sums are dose-weighted when the dose is known
        "do_save_noDW": "No",
        "dose_per_frame": _num(dose) if dose else "1",
        "pre_exposure": "0",
        "do_save_ps": "No",
        "group_for_ps": "4",
        "other_args": "",
    }


def _ctffind_options() -> dict[str, str]:
    return {
        "input_star_mics": CORRECTED_STAR,
        "use_noDW": "No",
        "do_phaseshift": "No",
        "phase_min": "0",
        "phase_max": "180",
        "phase_step": "10",
        "dast": "100",
        "use_given_ps": "No",
        "slow_search": "No",
        "box": "512",
        "resmin": "30",
        "resmax": "5",
        "dfmin": "5000",
        "dfmax": "50000",
        "dfstep": "500",
        "ctf_win": "-1",
        "other_args": "",
    }


def _star_value(value: Any) -> str:
    """RELION's escapeStringForSTAR: an empty or white-spaced string in double quotes."""
    if isinstance(value, int):
        return f"{value:>12}"  # RELION's integers
    s = str(value)
    return f'"{s}"' if s == "" or s[0] in "\"'" or any(c.isspace() for c in s) else s


def _list_block(name: str, items: Mapping[str, Any]) -> str:
    width = max(10, *map(len, items))
    lines = "".join(f"_{k}{' ' * (12 + width - len(k))}{_star_value(v)}\n" for k, v in items.items())
    return f"\n# version {VERSION}\n\ndata_{name}\n\n{lines} \n"


def _loop_block(name: str, labels: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    if not rows:
        return ""  # RELION writes no empty table
    head = "".join(f"_{label} #{i} \n" for i, label in enumerate(labels, 1))
    body = "".join("".join(f"{_star_value(v):>10} " for v in row) + "\n" for row in rows)
    return f"\n# version {VERSION}\n\ndata_{name}\n\nloop_ \n{head}{body} \n"


def _job_star(type_label: str, options: Mapping[str, str]) -> str:
    """``job.star`` as RelionJob::write writes it: options by name (a std::map's order)."""
    return _list_block("job", {"rlnJobTypeLabel": type_label, "rlnJobIsContinue": 0, "rlnJobIsTomo": 0}) + (
        _loop_block(
            "joboptions_values", ("rlnJobOptionVariable", "rlnJobOptionValue"), sorted(options.items())
        )
    )


def _pipeline(jobs: Sequence[_Job], statuses: Sequence[str], counter: int) -> str:
    """A ``*_pipeline.star`` of ``jobs`` as PipeLine::write writes it (a node keeps the type it came in with)."""
    nodes: dict[str, str] = {}
    for job in jobs:
        for node, label in (*job.inputs, *job.outputs):
            nodes.setdefault(node, label)
    return (
        _list_block("pipeline_general", {"rlnPipeLineJobCounter": counter})
        + _loop_block(
            "pipeline_processes",
            (
                "rlnPipeLineProcessName",
                "rlnPipeLineProcessAlias",
                "rlnPipeLineProcessTypeLabel",
                "rlnPipeLineProcessStatusLabel",
            ),
            [(j.process, "None", j.type_label, s) for j, s in zip(jobs, statuses, strict=True)],
        )
        + _loop_block(
            "pipeline_nodes",
            ("rlnPipeLineNodeName", "rlnPipeLineNodeTypeLabel", "rlnPipeLineNodeTypeLabelDepth"),
            [(node, label, 1) for node, label in nodes.items()],
        )
        + _loop_block(
            "pipeline_input_edges",
            ("rlnPipeLineEdgeFromNode", "rlnPipeLineEdgeProcess"),
            [(node, j.process) for j in jobs for node, _ in j.inputs],
        )
        + _loop_block(
            "pipeline_output_edges",
            ("rlnPipeLineEdgeProcess", "rlnPipeLineEdgeToNode"),
            [(j.process, node) for j in jobs for node, _ in j.outputs],
        )
    )


def _pdf(lines: Sequence[str]) -> bytes:
    """A one-page PDF of text lines, for the logfile.pdf RELION's GUI opens for a job."""
    wrapped = [w for line in lines for w in textwrap.wrap(line, 120)]
    text = "".join(
        "(" + w.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ") Tj T* " for w in wrapped
    )
    stream = f"BT /F1 10 Tf 14 TL 40 550 Td {text}ET".encode("latin-1", "replace")
    objects = (
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 842 595] /Resources << /Font << /F1 4 0 R >> >> "
        b"/Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
    )
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (i, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)
