"""The web UI's and the viewer's guard: what a request must be (:mod:`.rules`), the same rules around any
ASGI app (:mod:`.asgi`), and the door's login with its bound on failed attempts (:mod:`.login`, :mod:`.door`)."""
