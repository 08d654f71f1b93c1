"""The broker fixtures of the TEM tests (real RabbitMQ STOMP, a topic namespace per test), reused here."""

from tests.tem.conftest import listener_log, start_listener, stomp_broker  # noqa: F401
