"""``simulation/*``: cryo-ET tilt series simulated from the specs in EM_SIMULATIONS, one partition per stack.

Thin: the spec lookup, the physics and the writing live in :mod:`em_platform.simulation.cryoet`. Every
asset is a deterministic function of (spec, stack number): the sample is drawn from the stack's own
random stream, so ``simulation/sample`` records what ``simulation/tilt_series`` will image.
"""

import base64

import dagster as dg

from em_platform.assets.presentation import materialize_result, neuroglancer_link
from em_platform.assets.retries import retry_on_outage
from em_platform.partitions import simulations
from em_platform.resources import CatalogResource, DaskResource, SimulationSpecsResource, StorageResource
from em_platform.simulation.cryoet import acquisition
from em_platform.simulation.cryoet.assembly import assemble, bead_count
from em_platform.simulation.cryoet.catalog_record import simulate_and_catalog
from em_platform.simulation.cryoet.models import citation, load_library
from em_platform.simulation.cryoet.session_copy import copy_session, session_copies_root
from em_platform.simulation.cryoet.spec import Spec
from em_platform.simulation.cryoet.specs import find_stack_spec
from em_platform.simulation.cryoet.stack import stack_folder
from em_platform.simulation.truth import ground_truth_from_dict

GROUP = "simulation"


def _spec(context: dg.AssetExecutionContext, specs: SimulationSpecsResource) -> tuple[Spec, int]:
    spec, stack_no, entry = find_stack_spec(specs.folder, context.partition_key)
    context.log.info(f"{context.partition_key}: stack {stack_no} of {entry.path} (sha1 {entry.fingerprint})")
    return spec, stack_no


@dg.asset(
    key=["simulation", "particle_library"],
    group_name=GROUP,
    partitions_def=simulations,
    kinds={"python"},
    description="The stack's particle models (PDB/mmCIF atoms via gemmi, or MRC maps), loaded and checked.",
)
def particle_library(
    context: dg.AssetExecutionContext, simulation_specs: SimulationSpecsResource
) -> dg.MaterializeResult:
    spec, _ = _spec(context, simulation_specs)
    library = load_library(spec)
    rows = [
        f"| {m.name} | {'atoms' if m.is_atomic else 'map'} | {m.n_points} | {', '.join(m.kinds)} | {2 * m.radius_A / 10:.1f} | {citation(m.name) or m.source} |"
        for m in library.values()
    ]
    table = (
        "| model | kind | points | elements | diameter nm | source |\n|---|---|---|---|---|---|\n"
        + "\n".join(rows)
    )
    return materialize_result(metadata={"models": dg.MetadataValue.md(table), "n_models": len(library)})


@dg.asset(
    key=["simulation", "sample"],
    group_name=GROUP,
    partitions_def=simulations,
    deps=[particle_library],
    kinds={"python"},
    description="Particles and gold beads placed without overlap in the ice slab, uniformly random orientations.",
)
def sample(
    context: dg.AssetExecutionContext, simulation_specs: SimulationSpecsResource
) -> dg.MaterializeResult:
    spec, stack_no = _spec(context, simulation_specs)
    library = load_library(spec)
    placed = assemble(spec, library, acquisition.rng_for(spec, stack_no, acquisition.ASSEMBLY))
    volume = placed.size_A[0] * placed.size_A[1] * placed.size_A[2]
    filled = sum(library[p.model].volume_A3 for p in placed.particles)
    return materialize_result(
        metadata={
            "particles": len(placed.particles),
            "beads": len(placed.beads),
            "expected_beads": bead_count(spec),
            "slab_nm": dg.MetadataValue.json([round(v / 10, 1) for v in placed.size_A]),
            "volume_fraction": round(filled / volume, 5),
        }
    )


@dg.asset(
    key=["simulation", "tilt_series"],
    group_name=GROUP,
    partitions_def=simulations,
    deps=[sample],
    kinds={"mrc", "zarr", "dask"},
    description="The tilt series as a microscope session (MRC, noiseless twin, mdoc, tlt, movies, phantom, "
    "ground truth), published whole, plus its OME-Zarr and catalog record.",
    pool="pixels",
)
def tilt_series(
    context: dg.AssetExecutionContext,
    simulation_specs: SimulationSpecsResource,
    storage: StorageResource,
    catalog: CatalogResource,
    dask: DaskResource,
) -> dg.MaterializeResult:
    spec, stack_no = _spec(context, simulation_specs)
    key = context.partition_key
    try:
        out = simulate_and_catalog(
            spec,
            stack_no,
            store=storage.store(),
            catalog=catalog.db(),
            lineage={
                "run_id": context.run.run_id,
                "asset_key": "simulation/tilt_series",
                "partition_key": key,
            },
            dask_client=dask.get_client,
            logger=context.log,
        )
        store = storage.store()
        if not store.is_local:  # cryo processing reads sessions from folders: a local copy for it
            copy_session(
                store,
                stack_folder(store, spec, stack_no),
                session_copies_root(storage.downloads_root),
                spec.name,
                key,
            )
    except Exception as exc:
        retry_on_outage(context, exc, storage)  # an outage is retried later
        raise
    rec = out.record
    return materialize_result(
        metadata={
            "folder": dg.MetadataValue.path(out.folder_url),
            "volume": dg.MetadataValue.path(out.volume_url),
            **neuroglancer_link(storage, out.volume_url, context.log),
            "shape": str(tuple(rec["metadata"]["core"]["volume_shape"])),
            "pixel_size_A": spec.pixel_size_A,
            "catalog_id": rec["id"],
            "simulated": out.simulated,
            "seconds": round(out.seconds, 2),
            "thumbnail": dg.MetadataValue.md(
                f"![{key}](data:image/png;base64,{base64.b64encode(out.thumbnail_png).decode()})"
            ),
        }
    )


@dg.asset(
    key=["simulation", "ground_truth"],
    group_name=GROUP,
    partitions_def=simulations,
    deps=[tilt_series],
    kinds={"json"},
    description="The published ground_truth.json read back and checked against the stack's files.",
)
def ground_truth(
    context: dg.AssetExecutionContext, simulation_specs: SimulationSpecsResource, storage: StorageResource
) -> dg.MaterializeResult:
    spec, stack_no = _spec(context, simulation_specs)
    store = storage.store()
    folder = stack_folder(store, spec, stack_no)
    truth = ground_truth_from_dict(store.read_json(f"{folder}/ground_truth.json"))
    listed = [v for k, v in truth.files.items() if k != "frames"] + list(truth.files.get("frames", []))
    missing = [f for f in listed if not store.exists(f"{folder}/{f}")]
    if missing:
        raise FileNotFoundError(f"{folder}: ground truth lists files that are not there: {missing[:5]}")
    if truth.spec != spec.to_doc():
        raise ValueError(f"{folder}: the published stack was made from another version of spec {spec.name}")
    rows = "\n".join(
        f"| {t.z_index} | {t.nominal_angle_deg:g} | {t.true_angle_deg:.2f} | {t.in_plane_rotation_deg:.2f} | "
        f"{t.shift_px[0]:.2f}, {t.shift_px[1]:.2f} | {t.defocus_A / 1e4:.3f} | {t.accumulated_dose_e_per_A2:g} |"
        for t in truth.tilts
    )
    table = (
        "| z | nominal ° | true ° | in-plane ° | shift px | defocus µm | prior dose e/Å² |\n|---|---|---|---|---|---|---|\n"
        + rows
    )
    return materialize_result(
        metadata={
            "path": dg.MetadataValue.path(store.to_url(f"{folder}/ground_truth.json")),
            "tilts": dg.MetadataValue.md(table),
            "particles": len(truth.particles),
            "fiducials": len(truth.fiducials),
            "schema": truth.schema,
        }
    )


simulation_assets = [particle_library, sample, tilt_series, ground_truth]
