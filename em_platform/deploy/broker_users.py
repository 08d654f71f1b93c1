"""The broker's users, as RabbitMQ definitions imported at its start: the platform's, which may do
everything, and the microscope's, which may publish only the scope's topics and read only the platform's
answers (RabbitMQ's own permissions and topic permissions; docker/compose.yaml's ``broker-init``).

A microscope PC on the facility network then cannot forge a QC verdict, read another scope's tiles, or
declare anything beyond its own subscriptions, whatever its software does. Passwords come from the
environment and are stored only as RabbitMQ's salted SHA-256 hashes.

``python -m em_platform.deploy.broker_users FILE --tls DIR`` writes the definitions, and the first time the
certificate of the broker's published STOMP-over-TLS port (:func:`broker_tls`); RabbitMQ loads the
definitions at every start (``load_definitions``), so a password changed in docker/.env applies after a
restart.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import sys
from pathlib import Path

# STOMP subscriptions are queues RabbitMQ names stomp-subscription-*; topics are routing keys of amq.topic
_SUBSCRIPTIONS = r"stomp-subscription-.*"


class BrokerUsersError(ValueError):
    """A setting the broker's users need is missing or unusable; the message names it."""


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password)), 4-byte salt."""
    salt = salt if salt is not None else secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def routing_prefix(topic_prefix: str) -> str:
    """The routing-key prefix of the platform's topics: pigeon's destination prefix after ``/topic/``."""
    if topic_prefix and topic_prefix[-1] not in "./":
        topic_prefix += "."  # pigeon's rule (em_platform.tem.broker.normalize_prefix)
    if not topic_prefix.startswith("/topic/"):
        raise BrokerUsersError(
            f"EM_BROKER_TOPIC_PREFIX={topic_prefix!r}: the scope's permissions are set on RabbitMQ's topic "
            "exchange, so the prefix must start with /topic/"
        )
    return topic_prefix.removeprefix("/topic/")


def _topics(prefix: str, topics: tuple[str, ...]) -> str:
    return "^(" + "|".join(re.escape(prefix + t) for t in topics) + ")$"


def definitions(env: dict[str, str]) -> dict:
    """RabbitMQ definitions for the platform's and the scope's users, from the environment."""

    def setting(name: str) -> str:
        value = env.get(name, "")
        if not value:
            raise BrokerUsersError(f"{name} is not set: the broker's users need it (docker/.env)")
        return value

    platform, scope = setting("EM_BROKER_USERNAME"), setting("EM_SCOPE_BROKER_USERNAME")
    if platform == scope:
        raise BrokerUsersError(
            f"EM_SCOPE_BROKER_USERNAME={scope!r} is the platform's own user: the microscope needs one of its own"
        )
    from em_platform.tem.protocol import (  # what the scope sends; what the platform answers
        CONSUMED,
        PUBLISHED,
    )

    prefix = routing_prefix(env.get("EM_BROKER_TOPIC_PREFIX") or "/topic/")
    own = rf"^(amq\.topic|{_SUBSCRIPTIONS})$"
    return {
        "users": [
            {
                "name": name,
                "password_hash": password_hash(setting(password)),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": tags,
            }
            for name, password, tags in (
                (platform, "EM_BROKER_PASSWORD", ["administrator"]),
                (scope, "EM_SCOPE_BROKER_PASSWORD", []),
            )
        ],
        "vhosts": [{"name": "/"}],
        "permissions": [
            {"user": platform, "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"},
            {"user": scope, "vhost": "/", "configure": f"^{_SUBSCRIPTIONS}$", "write": own, "read": own},
        ],
        "topic_permissions": [
            {
                "user": scope,
                "vhost": "/",
                "exchange": "amq.topic",
                "write": _topics(prefix, CONSUMED),  # publish: the scope's own messages only
                "read": _topics(prefix, PUBLISHED),  # subscribe: the platform's answers only
            }
        ],
    }


# The official rabbitmq image runs RabbitMQ as uid/gid 999 (as does docker/standin/rabbitmq): its TLS key's owner
RABBITMQ_UID = 999


def broker_tls(folder: Path, env: dict[str, str]) -> bool:
    """The broker's STOMP TLS certificate (and its private CA) in ``folder``, unless there; True when made.

    For the names the microscope PCs and the platform use: ``rabbitmq`` (the compose network), loopback, and
    ``EM_PUBLIC_HOST`` (the facility's name or address of this host). The key is RabbitMQ's alone (0600)."""
    from em_platform.deploy.certificates import make_certificates

    public = [h.strip() for h in env.get("EM_PUBLIC_HOST", "").split(",") if h.strip()]
    owner = (RABBITMQ_UID, RABBITMQ_UID) if os.geteuid() == 0 else None
    names = ("rabbitmq", "localhost", "127.0.0.1", *public)
    return make_certificates(folder, names, common_name="em_platform broker", key_owner=owner)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    tls = None
    if len(args) == 3 and args[1] == "--tls":
        tls = Path(args[2])
        args = args[:1]
    if len(args) != 1:
        print(
            "usage: python -m em_platform.deploy.broker_users DEFINITIONS.json [--tls DIR]", file=sys.stderr
        )
        return 2
    try:
        doc = definitions(dict(os.environ))
    except BrokerUsersError as exc:
        print(f"broker users: {exc}", file=sys.stderr)
        return 1
    path = Path(args[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(doc, indent=1))
    partial.chmod(0o644)  # RabbitMQ reads it as its own user; it holds hashes only
    partial.replace(path)
    users = ", ".join(f"{u['name']}" for u in doc["users"])
    print(f"broker users {users} written to {path}")
    if tls is not None:
        made = broker_tls(tls, dict(os.environ))
        print(f"broker TLS certificate {'made' if made else 'already'} in {tls}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
