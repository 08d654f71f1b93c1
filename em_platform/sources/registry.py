"""The public sources em_platform ingests, each with its endpoints, datasets and weight."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from em_platform.sources import empiar, epfl, flyem, idr, openorganelle
from em_platform.sources.dataset import Source
from em_platform.switch import parse_switch


@dataclass(frozen=True)
class SourceKind:
    name: str  # the catalog's source and the asset key ingest/<name>
    title: str
    # a frozen dataclass whose defaults are the real public endpoints; .validate() names a bad field
    endpoints: type
    datasets: Mapping[str, Any]  # partition key → what to fetch
    make_source: Callable[[str, Any], Source]
    heavy: bool  # GB-sized downloads and conversions: at most one such run at a time (dagster.yaml)


SOURCES: dict[str, SourceKind] = {
    k.name: k
    for k in (
        SourceKind(
            "empiar",
            "EBI EMPIAR entries (DM3/DM4, MRC, TIFF slices over FTP or HTTPS)",
            empiar.EmpiarEndpoints,
            empiar.DATASETS,
            empiar.make_source,
            heavy=False,
        ),
        SourceKind(
            "epfl",
            "EPFL CVLab hippocampus FIB-SEM stack (one multi-page TIFF over HTTP, parallel ranged download)",
            epfl.EpflEndpoints,
            epfl.DATASETS,
            epfl.make_source,
            heavy=True,
        ),
        SourceKind(
            "flyem",
            "FlyEM hemibrain grayscale crops from DVID (blocks in parallel), dataset metadata from neuPrint",
            flyem.FlyemEndpoints,
            flyem.DATASETS,
            flyem.make_source,
            heavy=True,
        ),
        SourceKind(
            "idr",
            "IDR images (OME-TIFF over FTP, HTTP fallback; metadata from the IDR JSON API)",
            idr.IdrEndpoints,
            idr.DATASETS,
            idr.make_source,
            heavy=False,
        ),
        SourceKind(
            "openorganelle",
            "OpenOrganelle (COSEM) Zarr/N5 multiscales on S3, streamed chunk by chunk",
            openorganelle.OpenOrganelleEndpoints,
            openorganelle.DATASETS,
            openorganelle.make_source,
            heavy=True,
        ),
    )
}


def endpoint_env_name(source: str, field_name: str) -> str:
    """The environment variable that sets a source's endpoint default: EM_<SOURCE>_<FIELD>."""
    return f"EM_{source.upper()}_{field_name.upper()}"


def endpoint_defaults(kind: SourceKind, env: Mapping[str, str]) -> dict[str, Any]:
    """Every endpoint field's default: the environment's EM_<SOURCE>_<FIELD> if set, else the public one.

    A facility sets its mirrors once for every run (and the README's commands run against loopback mirrors
    unchanged); run config still overrides per run. Raises ValueError naming the variable for a bad value.
    """
    hints = typing.get_type_hints(kind.endpoints)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(kind.endpoints):
        if not f.init:
            continue
        name = endpoint_env_name(kind.name, f.name)
        raw = env.get(name, "").strip()
        if not raw:
            out[f.name] = f.default
            continue
        try:
            out[f.name] = _parse(raw, hints[f.name])
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a valid {f.name} ({hints[f.name]})") from None
    try:
        kind.endpoints(**out).validate()
    except ValueError as exc:
        names = ", ".join(
            endpoint_env_name(kind.name, k) for k in out if env.get(endpoint_env_name(kind.name, k))
        )
        raise ValueError(f"{names or kind.name + ' endpoints'}: {exc}") from None
    return out


def _parse(raw: str, hint: Any) -> Any:
    types = set(typing.get_args(hint)) - {type(None)} or {hint}
    if bool in types:
        return parse_switch(raw)
    if int in types:
        return int(raw)
    if float in types:
        return float(raw)
    return raw
