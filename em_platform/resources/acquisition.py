"""The acquisition hardware as the platform sees it: the journal the scope's messages land in, and the way
verdicts go back. A thin wrapper: the montage run's tile source, the journal and the broker publisher
are :mod:`em_platform.tem`'s.

Two implementations: the embedded simulated scope (verdicts go to the journal, where ``scope-sim``
reads them) and a broker-fed scope (verdicts also go out on the STOMP broker, as the Allen QC service's do,
with the same topic prefix and credentials the listener uses).
"""

import os
import threading
from abc import ABC, abstractmethod
from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from em_platform.settings import broker_tls
from em_platform.tem.broker import DEFAULT_TOPIC_PREFIX, BrokerSettings, parse_broker
from em_platform.tem.journal import Journal, MontageRow, TileRow
from em_platform.tem.tile_source import JournalTileSource, Outbox


class AcquisitionHardware(dg.ConfigurableResource, ABC):
    """Reads the acquisition journal; sends per-tile results and QC verdicts back to the microscope."""

    journal_url: str
    # The scope's calibration at its imaging magnification. TEM_comms sends pixel size and rotation only
    # with montage.complete; known beforehand, live matching is centred on the stage positions.
    pixel_size_nm: float | None = None
    rotation_angle_rad: float | None = None  # image axes -> stage axes (TEM_comms rotation_angle)
    # Folders raw tiles may be read from (EM_SCOPE_SHARES); None: the settings' (the environment's).
    tile_shares: list[str] | None = None
    _journal: Journal | None = PrivateAttr(default=None)

    def shares(self) -> list[str]:
        if self.tile_shares is not None:
            return list(self.tile_shares)
        from em_platform.settings import load_settings

        return list(load_settings().scope_shares)

    def journal(self) -> Journal:
        if self._journal is None:
            self._journal = Journal(self.journal_url, tile_shares=self.shares())
        return self._journal

    def montages_after(self, seq: int, limit: int = 1000) -> list[MontageRow]:
        return self.journal().montages_after(seq, limit)

    def montage(self, montage_id: str) -> MontageRow | None:
        return self.journal().montage(montage_id)

    def tiles(self, montage_id: str, after_seq: int = 0) -> list[TileRow]:
        return self.journal().tiles(montage_id, after_seq=after_seq)

    def stage_rotation(self, montage_id: str) -> float:
        """Image axes -> stage axes (rad): the montage's own (montage.complete), else the configured one."""
        m = self.montage(montage_id)
        if m is not None and m.announced_complete and m.rotation_angle is not None:
            return m.rotation_angle
        return self.rotation_angle_rad or 0.0

    def tile_source(self) -> JournalTileSource:
        """What a montage run reads tiles from and reports verdicts to; close it when the run ends."""
        return JournalTileSource(
            self.journal(),
            pixel_size_nm=self.pixel_size_nm,
            rotation_rad=self.rotation_angle_rad,
            outbox=self._outbox(),
            tile_shares=self.journal().tile_shares,
        )

    def send(self, topic: str, payload: dict[str, Any], *, montage_id: str | None = None) -> None:
        """Send one outgoing message now (e.g. ``buffer.status`` during an upload), journal first.

        ``qc.status`` carries no montage id on the wire; ``montage_id`` files it in the journal.
        """
        self.journal().record(topic, payload)
        if topic == "qc.status":
            self.journal().record_qc_status(montage_id, payload["status"], payload.get("reason"))
        self._publish([(topic, payload)])

    @abstractmethod
    def _publish(self, messages: list[tuple[str, dict[str, Any]]]) -> None: ...

    @abstractmethod
    def _outbox(self) -> Outbox | None: ...

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._journal is not None:
            self._journal.dispose()
            self._journal = None


class SimulatedScope(AcquisitionHardware):
    """The embedded microscope (``em-platform scope-sim``): everything stays in the journal."""

    def _publish(self, messages: list[tuple[str, dict[str, Any]]]) -> None:
        return None

    def _outbox(self) -> Outbox | None:
        return None


class BrokerScope(AcquisitionHardware):
    """A real (or simulated) scope behind a STOMP broker: outgoing messages are also published there.

    ``topic_prefix``, ``username``, ``password`` and ``vhost`` are the listener's (``EM_BROKER_TOPIC_PREFIX``,
    ``EM_BROKER_USERNAME``, ``EM_BROKER_PASSWORD``, ``EM_BROKER_VHOST``): empty prefix on ActiveMQ Artemis;
    ``EM_BROKER_TLS`` as for them.
    """

    broker: str  # HOST:PORT of the STOMP broker
    topic_prefix: str = DEFAULT_TOPIC_PREFIX
    username: str | None = None
    password: str | None = None
    vhost: str | None = None  # None: $EM_BROKER_VHOST, else "/"
    _publisher: Any = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)  # the run's outbox thread publishes too

    def settings(self) -> BrokerSettings:
        host, port = parse_broker(self.broker)
        # the password from EM_BROKER_PASSWORD at connect time when not given: secrets stay out of run config
        password = self.password or os.environ.get("EM_BROKER_PASSWORD") or None
        vhost = self.vhost or os.environ.get("EM_BROKER_VHOST", "").strip() or "/"
        tls = broker_tls(os.environ.get("EM_BROKER_TLS", ""))  # like the password: the process's setting
        return BrokerSettings(host, port, self.topic_prefix, self.username, password, vhost, tls)

    def _publish(self, messages: list[tuple[str, dict[str, Any]]]) -> None:
        with self._lock:
            if self._publisher is None:
                self._publisher = self.settings().publisher()
        self._publisher.publish_many(messages)

    def _outbox(self) -> Outbox | None:
        return Outbox(self._publish)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None
        super().teardown_after_execution(context)
