"""The broker's users as RabbitMQ definitions (docker/compose.yaml's broker-init): what the scope's user may
publish and read, spelled as RabbitMQ matches routing keys; settings that are missing or wrong are named.
tests/compose checks the same definitions against a running RabbitMQ."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

from em_platform.deploy.broker_users import BrokerUsersError, definitions, password_hash, routing_prefix
from em_platform.tem.protocol import CONSUMED, PUBLISHED

ENV = {
    "EM_BROKER_USERNAME": "em",
    "EM_BROKER_PASSWORD": "platform-secret",
    "EM_SCOPE_BROKER_USERNAME": "scope",
    "EM_SCOPE_BROKER_PASSWORD": "scope-secret",
}


def test_passwords_are_stored_as_rabbitmqs_salted_sha256():
    stored = base64.b64decode(password_hash("s3cret", salt=b"\x01\x02\x03\x04"))
    assert (
        stored[:4] == b"\x01\x02\x03\x04" and stored[4:] == hashlib.sha256(b"\x01\x02\x03\x04s3cret").digest()
    )
    assert password_hash("s3cret") != password_hash("s3cret")  # a new salt each time
    doc = definitions(ENV)
    assert "platform-secret" not in str(doc) and "scope-secret" not in str(doc)


@pytest.mark.parametrize(
    "prefix,routing", [("/topic/", ""), ("/topic/em", "em."), ("/topic/em_deploy.", "em_deploy.")]
)
def test_the_scope_publishes_only_its_topics_and_reads_only_the_answers(prefix, routing):
    [topics] = definitions({**ENV, "EM_BROKER_TOPIC_PREFIX": prefix})["topic_permissions"]
    write, read = re.compile(topics["write"]), re.compile(topics["read"])
    for topic in CONSUMED:
        assert write.match(routing + topic) and not read.match(routing + topic), topic
    for topic in PUBLISHED:
        assert read.match(routing + topic) and not write.match(routing + topic), topic
    assert not write.match(routing + "tile.rawx") and not read.match("other." + routing + "qc.tile")


def test_wrong_settings_are_named():
    with pytest.raises(BrokerUsersError, match="EM_SCOPE_BROKER_PASSWORD"):
        definitions({**ENV, "EM_SCOPE_BROKER_PASSWORD": ""})
    with pytest.raises(BrokerUsersError, match="one of its own"):
        definitions({**ENV, "EM_SCOPE_BROKER_USERNAME": "em"})
    with pytest.raises(BrokerUsersError, match="/topic/"):
        routing_prefix("/exchange/em/")


def test_broker_init_makes_the_brokers_tls_certificate_once_for_its_names(tmp_path, monkeypatch, capsys):
    """`broker_users FILE --tls DIR` (compose's broker-init): a certificate for the compose name, loopback and
    EM_PUBLIC_HOST, signed by a CA of its own, with a key only its owner reads; a restart keeps it."""
    from cryptography import x509

    from em_platform.deploy.broker_users import main
    from em_platform.deploy.certificates import CA, CERT, KEY

    for name, value in {**ENV, "EM_PUBLIC_HOST": "em.facility.example, 10.1.2.3"}.items():
        monkeypatch.setenv(name, value)
    tls = tmp_path / "tls"
    assert main([str(tmp_path / "definitions.json"), "--tls", str(tls)]) == 0
    assert "broker TLS certificate made" in capsys.readouterr().out
    cert = x509.load_pem_x509_certificate((tls / CERT).read_bytes())
    ca = x509.load_pem_x509_certificate((tls / CA).read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["rabbitmq", "localhost", "em.facility.example"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.1.2.3"]
    assert (tls / KEY).stat().st_mode & 0o777 == 0o600
    before = (tls / CERT).read_bytes()
    assert main([str(tmp_path / "definitions.json"), "--tls", str(tls)]) == 0
    assert "broker TLS certificate already" in capsys.readouterr().out and (tls / CERT).read_bytes() == before
    assert main([str(tmp_path / "definitions.json"), "--tls"]) == 2  # a folder is required after --tls
