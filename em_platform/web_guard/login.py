"""The door's login: the users file's bcrypt hashes, and a bound on failed logins per client and time.

Basic authentication sends the password with every request, and the UI makes many (its GraphQL polls every
few seconds): a bcrypt check each time would cost a core. A password that passed is remembered for
:data:`REMEMBER_SECONDS` as an HMAC under a key that lives in this process only (never the password, never
on disk); a changed users file forgets them all. A wrong password is always checked in full, so guessing
costs the guesser bcrypt's time, and a client that fails :attr:`FailedLogins.limit` times within
:attr:`FailedLogins.window_s` is answered 429 without a check until the window has passed.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REMEMBER_SECONDS = 300.0
MAX_REMEMBERED = 4096
# checked in place of an unknown user's hash, so that a name that does not exist takes as long as one that does
_NOBODY = b"$2b$12$kqpDnBNX8UGN/QNMaqCZb.6Iumu38d0PpLNdrSdNy1RwqzGbJBRAq"


class Users:
    """``name hash`` lines (what ``python -m em_platform.deploy ui-user`` writes), read again when the file
    changes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None
        self._hashes: dict[str, bytes] = {}
        self._key = secrets.token_bytes(32)
        self._passed: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    def _current(self) -> dict[str, bytes]:
        try:
            st = self.path.stat()
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            seen = None
        with self._lock:
            if seen != self._seen:
                text = self.path.read_text() if seen else ""
                self._hashes = {
                    parts[0]: parts[1].encode()
                    for parts in (line.split() for line in text.splitlines())
                    if len(parts) == 2 and not parts[0].startswith("#")
                }
                self._passed.clear()
                self._seen = seen
            return self._hashes

    def check(self, name: str, password: str, now: float | None = None) -> bool:
        """True when ``password`` is ``name``'s."""
        import bcrypt

        now = time.monotonic() if now is None else now
        hashed = self._current().get(name)
        token = hmac.new(self._key, f"{name}\0{password}".encode(), hashlib.sha256).digest()
        with self._lock:
            until = self._passed.get(token)
            if hashed is not None and until is not None and until > now:
                return True
        ok = bcrypt.checkpw(password.encode(), hashed or _NOBODY) and hashed is not None
        if ok:
            with self._lock:
                self._passed[token] = now + REMEMBER_SECONDS
                self._passed.move_to_end(token)
                while len(self._passed) > MAX_REMEMBERED:
                    self._passed.popitem(last=False)
        return ok


@dataclass
class FailedLogins:
    """At most ``limit`` failed logins per client within ``window_s`` seconds; at most ``max_clients``
    clients remembered (the longest quiet is forgotten first), so the bound's own memory is bounded."""

    limit: int = 10
    window_s: float = 300.0
    max_clients: int = 10_000
    _failures: collections.OrderedDict[str, collections.deque] = field(
        default_factory=collections.OrderedDict
    )
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def retry_after(self, client: str, now: float | None = None) -> float:
        """Seconds until ``client`` may try again; 0 when it may now."""
        now = time.monotonic() if now is None else now
        with self._lock:
            times = self._failures.get(client)
            if not times or len(times) < self.limit:
                return 0.0
            return max(0.0, times[0] + self.window_s - now)

    def failed(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            times = self._failures.pop(client, None) or collections.deque(maxlen=self.limit)
            while times and times[0] + self.window_s <= now:
                times.popleft()
            times.append(now)
            self._failures[client] = times  # the most recent last
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)
