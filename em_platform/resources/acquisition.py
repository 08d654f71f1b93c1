"""The acquisition hardware as the platform sees it: montages and tiles from the journal, QC verdicts back.

Two implementations: the embedded simulated scope (verdicts go to the journal, where ``scope-sim``
reads them) and a broker-fed scope (verdicts also go out on the STOMP broker, as the Allen QC service's do).
"""

from abc import ABC, abstractmethod
from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from em_platform.tem.journal import Journal, MontageRow, TileRow


class AcquisitionHardware(dg.ConfigurableResource, ABC):
    """Reads the acquisition journal; sends per-tile results and QC verdicts back to the microscope."""

    journal_url: str
    # The scope's pixel size at its imaging magnification (nm). TEM_comms sends it only with
    # montage.complete; with it known beforehand, live matching is centred on the stage positions.
    pixel_size_nm: float | None = None
    _journal: Journal | None = PrivateAttr(default=None)

    def journal(self) -> Journal:
        if self._journal is None:
            self._journal = Journal(self.journal_url)
        return self._journal

    def montages_after(self, seq: int, limit: int = 1000) -> list[MontageRow]:
        return self.journal().montages_after(seq, limit)

    def montage(self, montage_id: str) -> MontageRow | None:
        return self.journal().montage(montage_id)

    def tiles(self, montage_id: str, after_seq: int = 0) -> list[TileRow]:
        return self.journal().tiles(montage_id, after_seq=after_seq)

    def send(self, topic: str, payload: dict[str, Any], *, montage_id: str | None = None) -> None:
        """Send one outgoing message (tile statistics, matches, qc.tile, qc.status, ...).

        ``qc.status`` carries no montage id on the wire; ``montage_id`` files it in the journal.
        """
        self.journal().record(topic, payload)
        if topic == "qc.status":
            self.journal().record_qc_status(montage_id, payload["status"], payload.get("reason"))
        self._publish(topic, payload)

    def report_tile(self, tile_id: str, outgoing: list[tuple[str, dict[str, Any]]], **results: Any) -> None:
        """A judged tile: its outgoing messages and results into the journal in one commit, then out."""
        self.journal().record_tile_report(tile_id, outgoing, **results)
        for topic, payload in outgoing:
            self._publish(topic, payload)

    @abstractmethod
    def _publish(self, topic: str, payload: dict[str, Any]) -> None: ...

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._journal is not None:
            self._journal.dispose()
            self._journal = None


class SimulatedScope(AcquisitionHardware):
    """The embedded microscope (``em-platform scope-sim``): everything stays in the journal."""

    def _publish(self, topic: str, payload: dict[str, Any]) -> None:
        return None


class BrokerScope(AcquisitionHardware):
    """A real (or simulated) scope behind a STOMP broker: outgoing messages are also published there."""

    broker: str  # HOST:PORT of the STOMP broker
    topic_prefix: str = "/topic/"
    _publisher: Any = PrivateAttr(default=None)

    def _publish(self, topic: str, payload: dict[str, Any]) -> None:
        from em_platform.tem.protocol import BrokerPublisher, parse_broker

        if self._publisher is None:
            host, port = parse_broker(self.broker)
            self._publisher = BrokerPublisher(host, port, topic_prefix=self.topic_prefix)
        self._publisher.publish(topic, payload)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None
        super().teardown_after_execution(context)
