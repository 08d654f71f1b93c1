"""The one ingest lifecycle, shared by the local inbox, the public sources and simulated stacks.

A record goes pending → processing → saving-data → complete, or failed with its error and retry count
(the catalog enforces the transitions); :class:`RecordLifecycle` moves one attempt's record, and every step
that keeps a catalog record (these ingests, the TEM montage upload) moves it through that class. The image is
written under a staging name and published in one step only after the record reached saving-data, so a
failed or killed run never leaves half an image where readers look, and a failure removes what was staged.
An ingest attempt is one :class:`IngestAttempt`:

    attempt = IngestAttempt(store=..., catalog=..., source="local", source_id=key, name=..., lineage=...)
    attempt.begin(description=..., files=[...])              # pending
    with attempt.failing_on_error():                         # any exception → failed, staging removed
        attempt.processing()
        written = write_image(vol, calibration, attempt.staging_url, ...)   # ingest.convert
        record = attempt.complete(written, files=[...], provenance={...})    # saving-data → complete
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard

from em_platform.catalog.db import CatalogDB
from em_platform.catalog.status import Status
from em_platform.storage import DataStore
from em_platform.storage.disk_full import disk_full
from em_platform.storage.outage import storage_outage

log = logging.getLogger(__name__)


class IngestError(RuntimeError):
    """A dataset could not be ingested; its catalog record is 'failed' with this message.

    ``outage`` says why the failure was a storage outage (transient: the run retries it later), or None.
    """

    def __init__(self, message: str, *, outage: str | None = None):
        super().__init__(message)
        self.outage = outage


@dataclass(frozen=True)
class IngestResult:
    """What an ingest produced (or kept): the record, where the image is, and its thumbnail."""

    record: dict[str, Any]
    volume_url: str
    thumbnail_url: str | None
    thumbnail_png: bytes | None  # None when nothing was converted and no thumbnail was found
    converted: bool  # False: the source had not changed since the last complete ingest


class Written(Protocol):
    """An image or a collection written to the staging URL (see :mod:`em_platform.ingest.convert`)."""

    @property
    def thumbnail_png(self) -> bytes: ...

    def core(self) -> dict[str, Any]: ...

    def technical(self, files: list[dict[str, Any]], header: dict[str, Any]) -> dict[str, Any]: ...

    def metadata(self, uri: str) -> dict[str, Any]: ...


def safe_name(text: str) -> str:
    """A file-system-safe name for a dataset's outputs and download folder."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "dataset"


class RecordLifecycle:
    """One attempt's catalog record moved pending → processing → saving-data → complete, or failed: the
    transitions alone, for a step that writes its data itself (:class:`IngestAttempt` stages an image; the
    montage upload copies the acquisition buffer)."""

    def __init__(self, catalog: CatalogDB, source: str, source_id: str, *, run_id: str | None = None):
        self.catalog = catalog
        self.source = source
        self.source_id = source_id
        self.run_id = run_id
        self.record_id: str | None = None

    def begin(self, *, description: str, files: list[dict[str, Any]]) -> dict[str, Any]:
        """pending: a new record, or the existing one brought back for a new attempt."""
        record = self.catalog.begin(
            self.source, self.source_id, description=description, files=files, run_id=self.run_id
        )
        self.record_id = record["id"]
        return record

    def processing(self, update: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._move(Status.PROCESSING, update)

    def saving_data(self, update: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._move(Status.SAVING_DATA, update)

    def complete(self, update: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._move(Status.COMPLETE, update)

    def fail(self, error: BaseException | str) -> None:
        """failed, with the error (nothing to mark before :meth:`begin`)."""
        if self.record_id is not None:
            self.catalog.transition(self.record_id, Status.FAILED, error=error, run_id=self.run_id)

    def failing_on_error(self) -> AbstractContextManager[None]:
        """Any exception inside marks the record failed and propagates."""
        return _failing_on_error(self.fail)

    def _move(self, status: Status, update: dict[str, Any] | None) -> dict[str, Any]:
        if self.record_id is None:
            raise RuntimeError(f"{self.source} {self.source_id}: begin() must come before {status.value}")
        return self.catalog.transition(self.record_id, status, run_id=self.run_id, update=update)


class IngestAttempt:
    """One attempt at bringing one dataset into ``ingest/<source>/<name>.ome.zarr`` with its record."""

    def __init__(
        self,
        *,
        store: DataStore,
        catalog: CatalogDB,
        source: str,
        source_id: str,
        name: str,
        lineage: dict[str, Any],
        logger: logging.Logger | logging.LoggerAdapter = log,
    ):
        self.store = store
        self.catalog = catalog
        self.source = source
        self.source_id = source_id
        self.lineage = lineage
        self.logger = logger
        self.record = RecordLifecycle(catalog, source, source_id, run_id=lineage.get("run_id"))
        self.volume_path = store.path("ingest", source, f"{name}.ome.zarr")
        self.thumbnail_path = store.path("ingest", source, f"{name}.thumbnail.png")
        self.staging = store.staging_path(self.volume_path)
        self.outage: str | None = None  # set by fail(): why the failure was a storage outage

    @property
    def staging_url(self) -> str:
        return self.store.to_url(self.staging)

    @property
    def storage_options(self) -> dict[str, Any] | None:
        return None if self.store.is_local else (self.store.storage_options or None)

    # -- before any work ---------------------------------------------------------------------------

    def previous(self) -> dict[str, Any] | None:
        return self.catalog.find(self.source, self.source_id)

    def still_published(self, previous: dict[str, Any] | None) -> TypeGuard[dict[str, Any]]:
        """True when the last attempt completed and its image is still where it was published."""
        return bool(
            previous and previous["status"] == Status.COMPLETE and self.store.exists(self.volume_path)
        )

    def kept(self, previous: dict[str, Any], why: str) -> IngestResult:
        """The result of an attempt that found nothing to do: the last complete ingest stands."""
        self.logger.info(
            "%s %s %s; keeping %s", self.source, self.source_id, why, previous["files"]["volume"]
        )
        png = None
        if self.store.exists(self.thumbnail_path):
            with self.store.fs.open(self.thumbnail_path, "rb") as f:
                png = f.read()
        return IngestResult(
            previous,
            self.store.to_url(self.volume_path),
            self.store.to_url(self.thumbnail_path) if png else None,
            png,
            converted=False,
        )

    # -- the transitions ---------------------------------------------------------------------------

    def begin(self, *, description: str, files: list[dict[str, Any]]) -> dict[str, Any]:
        """pending: a new record, or the existing one brought back for a new attempt."""
        return self.record.begin(description=description, files=files)

    def failed_to_start(self, exc: BaseException, description: str) -> None:
        """Record a failure that happened before the attempt could begin (e.g. the source cannot say)."""
        self.begin(description=description, files=[])
        self.fail(exc)

    def processing(self, update: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.record.processing(update)

    def complete(
        self,
        written: Written,
        *,
        files: list[dict[str, Any]] | None = None,
        provenance: dict[str, Any],
        header: dict[str, Any] | None = None,
        modality: str | None = None,
    ) -> dict[str, Any]:
        """saving-data (what was written) → publish the staged image and thumbnail → complete."""
        core = written.core()
        if modality:
            core["modality"] = modality
        saving: dict[str, Any] = {"metadata": {"core": core}}
        if files is not None:
            saving["files"] = {"source": files}
        record = self.record.saving_data(saving)
        self.store.write_bytes(self.thumbnail_path, written.thumbnail_png)
        self.store.publish(self.staging, self.volume_path)
        uri = self.store.to_url(self.volume_path)
        metadata = {
            "technical": written.technical(record["files"]["source"], header or {}),
            "provenance": provenance,
            **written.metadata(uri),
        }
        return self.record.complete(
            {
                "metadata": metadata,
                "files": {"volume": uri, "thumbnail": self.store.to_url(self.thumbnail_path)},
                "lineage": {k: v for k, v in self.lineage.items() if v is not None or k == "partition_key"},
            }
        )

    def fail(self, exc: BaseException) -> None:
        """failed, with the error; nothing staged survives (unless the store is down: then the record still
        says failed, and the staging left behind is named in the log). A storage outage is named in the
        record's error and in :attr:`outage`, so the caller can retry it."""
        try:
            self.store.remove(self.staging)
        except Exception as cleanup:
            self.logger.warning(
                "could not remove the staging %s (%s); it is never published", self.staging, cleanup
            )
        self.outage = storage_outage(exc, self.store) if isinstance(exc, Exception) else None
        error: BaseException | str = exc
        if self.outage:
            error = f"storage outage, retried: {self.outage} ({type(exc).__name__}: {exc})"
        elif full := disk_full(exc, {"EM_DATA_ROOT": self.store.url()}):
            error = full
        self.record.fail(error)

    def failing_on_error(self) -> AbstractContextManager[None]:
        """Any exception inside marks the record failed (staging removed) and propagates."""
        return _failing_on_error(self.fail)

    def result(self, record: dict[str, Any], written: Written) -> IngestResult:
        return IngestResult(
            record,
            self.store.to_url(self.volume_path),
            self.store.to_url(self.thumbnail_path),
            written.thumbnail_png,
            converted=True,
        )


@contextmanager
def _failing_on_error(fail: Callable[[BaseException], None]) -> Iterator[None]:
    """``fail(exc)`` for any exception inside, which then propagates."""
    try:
        yield
    except BaseException as exc:
        fail(exc)
        raise
