"""How assets show things to a person in the Dagster UI: numbers without float noise, images the UI draws.

Measured on the pinned Dagster (1.13) web UI: a Markdown metadata value is drawn inline on the asset and
partition pages only while its text is under 1000 characters (``MetadataEntry`` with ``expandSmallValues``);
longer ones sit behind "[Show Markdown]" (one click opens them in a dialog). Descriptions are drawn as
Markdown, but they belong to the definition, not to a partition. So a small schematic image (the focus map:
one pixel per tile, scaled up by an SVG wrapper) is drawn inline, and a real picture (a minimap, a
thumbnail) is attached whole behind "[Show Markdown]", with a link to the stored PNG beside it.
"""

from __future__ import annotations

import base64
import math
import typing
import warnings
from collections.abc import Mapping
from urllib.parse import quote

import dagster as dg

from em_platform.storage.disk_full import disk_full

INLINE_MARKDOWN_LIMIT = 1000  # characters: the UI draws shorter Markdown metadata inline
VIEW_LABEL = "open at full resolution in Neuroglancer"

# The focus-map colours (em_platform.stitch.previews: ColorBrewer RdYlGn) in words.
FOCUS_LEGEND = (
    "One cell per tile, row 0 at the top. Focus score (lower is sharper): green 0 (sharp) · "
    "yellow 0.5 · red 1 (blurred) · blue: nothing to focus on (blank: beam off; no tissue) · "
    "dark grey: no tile or no score."
)


def rounded(value: float, digits: int = 6) -> float:
    """``value`` to ``digits`` significant digits: a float32 header's 1.3600000381469728 nm shows as 1.36."""
    return float(f"{value:.{digits}g}")


def figure(value: float) -> float:
    """A measured figure as a person reads it: four significant digits, whole numbers kept whole
    (0.45017596 → 0.4502, 84.852055 → 84.85, 29472.486632 → 29472.0). The exact values stay in the
    catalog, the results database and the JSON figures."""
    if not math.isfinite(value) or value == 0:
        return value
    return round(value, max(0, 3 - math.floor(math.log10(abs(value)))))


def tidy(metadata: Mapping[str, typing.Any] | None) -> dict[str, typing.Any]:
    """``metadata`` with every float (plain or ``FloatMetadataValue``) a :func:`figure`; the label carries
    the unit (``_px``, ``_deg``, ``_A``, ``_nm``, ``seconds``)."""
    out: dict[str, typing.Any] = {}
    for key, value in (metadata or {}).items():
        if isinstance(value, float):
            value = figure(value)
        elif isinstance(value, dg.FloatMetadataValue) and value.value is not None:
            value = dg.MetadataValue.float(figure(value.value))
        out[key] = value
    return out


def materialize_result(**kwargs: typing.Any) -> dg.MaterializeResult:
    """``dg.MaterializeResult`` with its metadata :func:`tidy` (every asset reports through this)."""
    if kwargs.get("metadata") is not None:
        kwargs["metadata"] = tidy(kwargs["metadata"])
    return dg.MaterializeResult(**kwargs)


def check_result(**kwargs: typing.Any) -> dg.AssetCheckResult:
    """``dg.AssetCheckResult`` with its metadata :func:`tidy` (every check reports through this)."""
    if kwargs.get("metadata") is not None:
        kwargs["metadata"] = tidy(kwargs["metadata"])
    return dg.AssetCheckResult(**kwargs)


def voxel_size_metadata(voxel_size_nm: Mapping[str, float]) -> dg.MetadataValue:
    return dg.MetadataValue.json({axis: rounded(v) for axis, v in voxel_size_nm.items()})


def png_markdown(png: bytes, alt: str) -> dg.MetadataValue:
    """The whole PNG as Markdown (a data URI): drawn after one click on "[Show Markdown]" if it is large."""
    label = " ".join(alt.replace("[", "(").replace("]", ")").split())
    return dg.MetadataValue.md(f"![{label}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})")


def scaled_png_markdown(png: bytes, width: int, height: int, alt: str, caption: str = "") -> dg.MetadataValue:
    """A tiny PNG drawn at ``width`` x ``height`` CSS pixels with sharp pixel edges, inline when short enough.

    Markdown cannot size an image, so the PNG goes inside an SVG of that size (``image-rendering: pixelated``);
    the SVG is URL-encoded rather than base64-encoded to stay under the UI's inline limit.
    """
    b64 = base64.b64encode(png).decode("ascii")
    svg = (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}'>"
        f"<image width='{width}' height='{height}' preserveAspectRatio='none' "
        f"style='image-rendering:pixelated' href='data:image/png;base64,{b64}'/></svg>"
    )
    label = " ".join(alt.replace("[", "(").replace("]", ")").split())
    text = f"![{label}](data:image/svg+xml,{quote(svg, safe=chr(39) + '/+=:;,')})"
    return dg.MetadataValue.md(text + (f"\n\n{caption}" if caption else ""))


def viewer_link(
    storage: typing.Any, image_url: str, log: typing.Any, read_from: str | None = None
) -> str | None:
    """The link that opens the stored OME-Zarr at ``image_url`` at full resolution in `em-platform viewer`
    (``read_from``: the same image in the buffer, before its upload). A link that cannot be made (the image
    unreadable a moment after it was written, EM_VIEWER_URL unset) is a warning in the run's log and None,
    never a failed materialization: the image is there either way."""
    try:
        return storage.viewer_link(image_url, read_from)
    except Exception as exc:  # noqa: BLE001 — a missing link must not fail the asset
        log.warning(f"no Neuroglancer link for {image_url}: {exc}")
        return None


def view_metadata(link: str) -> dg.MetadataValue:
    """A link as the UI shows it: a short Markdown link, drawn inline ("open at full resolution"); the raw
    URL, hundreds of characters of view state, only when the Markdown would be too long to draw inline."""
    text = f"[{VIEW_LABEL}]({link})"
    return dg.MetadataValue.md(text) if len(text) < INLINE_MARKDOWN_LIMIT else dg.MetadataValue.url(link)


def neuroglancer_link(
    storage: typing.Any, image_url: str, log: typing.Any, read_from: str | None = None
) -> dict[str, dg.MetadataValue]:
    """``{"neuroglancer": <link>}`` for an asset's metadata (nothing when :func:`viewer_link` has none)."""
    link = viewer_link(storage, image_url, log, read_from)
    return {"neuroglancer": view_metadata(link)} if link else {}


def is_inline(value: typing.Any) -> bool:
    """Whether the UI draws this Markdown metadata value inline (not behind "[Show Markdown]")."""
    return isinstance(value, dg.MarkdownMetadataValue) and len(value.md_str or "") < INLINE_MARKDOWN_LIMIT


def failed_check(check_name: str, exc: BaseException, **facts: str) -> dg.AssetCheckResult:
    """A failed check carrying why a partition failed, shown on its page (the run fails right after)."""
    message = disk_full(exc) or " ".join(str(exc).split()) or type(exc).__name__
    return check_result(
        check_name=check_name,
        passed=False,
        severity=dg.AssetCheckSeverity.ERROR,
        description=message if len(message) <= 300 else message[:299] + "…",
        metadata={"error": dg.MetadataValue.text(message), "error_type": type(exc).__name__, **facts},
    )


def partitioned_check(
    name: str,
    asset: dg.AssetKey | typing.Sequence[str],
    partitions_def: dg.PartitionsDefinition,
    description: str,
    blocking: bool = False,
) -> dg.AssetCheckSpec:
    """A check evaluated per partition, so the UI shows each result under its partition (not "Partition —").

    ``partitions_def`` on a check is a preview feature of Dagster 1.13, chosen knowingly: its warning would
    otherwise print on every command that loads the code location.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec")
        return dg.AssetCheckSpec(
            name, asset=asset, partitions_def=partitions_def, blocking=blocking, description=description
        )


def montage_check(
    name: str, asset: dg.AssetKey | typing.Sequence[str], description: str, blocking: bool = False
) -> dg.AssetCheckSpec:
    """A check of a montage's run: not partition-aware in Dagster, unlike :func:`partitioned_check`.

    A facility keeps hundreds to thousands of montage partitions, and the open-source Dagster 1.13 webserver
    computes a partitioned check's statuses from every execution it ever had, for each check, on every poll
    of the lineage and asset pages (every 5 s): with the montage's ten checks, seconds a poll at 10³ montages,
    growing with them (bench/results/scale.json); unpartitioned, a fraction of a second at any count. The
    price: the UI lists a montage check's results by run, without the partition's name
    beside them; each result's description and metadata name what was measured, and the montage's own page
    (``tile_qc``) links to them.
    """
    return dg.AssetCheckSpec(name, asset=asset, blocking=blocking, description=description)


def montage_check_result(montage_id: str, **kwargs: typing.Any) -> dg.AssetCheckResult:
    """:func:`check_result` of a :func:`montage_check`: the montage named first in its description, which the
    UI shows in the check's history where a partitioned check would show the partition."""
    said = kwargs.get("description")
    kwargs["description"] = f"montage {montage_id}: {said}" if said else f"montage {montage_id}"
    return check_result(**kwargs)


def check_sentence(measured: str, limit: str, passed: bool, what_to_do: str) -> str:
    """A check's result in words, shown with it in the UI: what was measured against what limit, and, when it
    failed, what to do."""
    return f"{measured}; limit {limit}." + ("" if passed else f" {what_to_do[0].upper()}{what_to_do[1:]}.")
