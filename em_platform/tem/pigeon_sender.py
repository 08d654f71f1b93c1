"""pigeon's client as :class:`~em_platform.tem.broker.BrokerPublisher` sends with it, in a module of its own:
importing pigeon reads every installed distribution's metadata (0.8 s), which the code location's start-up
(and every run's) should not pay before anything is published."""

from __future__ import annotations

from pigeon import Pigeon
from pigeon.client import PigeonListener

from em_platform.tem.stomp_connection import StompEvents, close_connection, drop_connection, open_stomp

__all__ = ["PigeonSender"]


class PigeonSender(Pigeon):
    """pigeon's client with the connection handling replaced: no reconnect from the receiver thread, a
    connection attempt that cannot hang, and a virtual host in the CONNECT frame (see :func:`open_stomp`).
    Sending is pigeon's own ``_send``: same body and headers as every pigeon service."""

    def __init__(
        self,
        service: str,
        host: str,
        port: int,
        *,
        topic_prefix: str,
        vhost: str | None,
        tls: str | None,
        logger,
    ):
        super().__init__(service, host=host, port=port, logger=logger, topic_prefix=topic_prefix)
        self._host_port = (host, port)
        self._vhost = vhost
        self._tls = tls
        self._dropping = False
        self.events = StompEvents()

    def _handle_reconnect(self) -> None:  # called by stomp's receiver thread on a lost connection
        self._connected = False
        if not self._dropping:
            self._logger.warning(
                "lost the connection to the STOMP broker %s:%d; the next publish reconnects", *self._host_port
            )

    def connect_once(self, username: str | None, password: str | None, timeout: float) -> None:
        self.drop()
        self.events = StompEvents()
        self._connection = open_stomp(
            *self._host_port,
            self.events,
            listeners={"listener": PigeonListener(self._handle_message, self._handle_reconnect)},
            username=username,
            password=password,
            vhost=self._vhost,
            tls=self._tls,
            timeout=timeout,
        )
        self._connected = True

    def drop(self) -> None:
        self._connected = False
        self._dropping = True
        try:
            drop_connection(self._connection)
        finally:
            self._dropping = False

    def close(self, timeout: float = 2.0) -> None:
        self._connected = False
        self._dropping = True
        close_connection(self._connection, self.events, timeout)
