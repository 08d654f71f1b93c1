"""The bound on what stomp.py is handed (:class:`em_platform.tem.stomp_connection.FrameBound`): stomp.py holds a
whole frame in memory before it hands it on, so the listener's message bound sits between the socket and it."""

from __future__ import annotations

import hashlib
import random

import pytest

from em_platform.tem.stomp_connection import FrameBound, FrameTooLarge


def _message(ack: str, body: bytes, length: bool = True) -> bytes:
    headers = [b"MESSAGE", b"subscription:s", b"destination:/topic/x", b"message-id:m-" + ack.encode()]
    headers += [b"ack:" + ack.encode()] + ([b"content-length:%d" % len(body)] if length else [])
    return b"\n".join(headers) + b"\n\n" + body + b"\0"


def _stand_in(ack: str) -> bytes:
    headers = [b"MESSAGE", b"subscription:s", b"destination:/topic/x", b"message-id:m-" + ack.encode()]
    return b"\n".join([*headers, b"ack:" + ack.encode(), b"content-length:0"]) + b"\n\n\0"


@pytest.mark.parametrize("chunk", [1, 2, 7, 1000, 16384, 1 << 20])
def test_frames_past_the_bound_are_read_past_never_held(chunk):
    """stomp.py holds a whole frame before it hands it on: the bound sits before it. However the socket splits
    the stream, a MESSAGE past the bound reaches stomp.py as its headers alone, its length and digest recorded
    under its ack id; every other frame and heart-beat passes byte for byte."""
    big = random.Random(5).randbytes(5000).replace(b"\0", b"x")
    small = _message("a", b'{"x": 1}')
    binary = _message("c", b"with\0nul")  # a body with a NUL: its content-length says where it ends
    unframed = _message("e", b"small", length=False)
    receipt = b"RECEIPT\nreceipt-id:r-1\n\n\0"
    stream = b"\n" + small + b"\n" + _message("b", big) + binary + b"\r\n"
    stream += _message("d", big, length=False) + unframed + receipt + b"\n"
    bound = FrameBound(1000, keep=100)
    held = 0
    out = bytearray()
    for i in range(0, len(stream), chunk):
        out += bound.feed(stream[i : i + chunk])
        held = max(held, len(bound._buf))
    expected = b"\n" + small + b"\n" + _stand_in("b") + binary + b"\r\n" + _stand_in("d") + unframed
    assert bytes(out) == expected + receipt + b"\n"
    for ack in ("b", "d"):
        record = bound.oversized[ack]
        assert (record.length, record.sha256) == (len(big), hashlib.sha256(big).hexdigest())
        assert record.head == big[:100]
    assert held <= 1000 + 200 + chunk  # the bound, one frame's headers and one read


def test_other_frames_past_the_bound_close_the_connection():
    with pytest.raises(FrameTooLarge, match="'ERROR' frame .* larger than 1000 bytes"):
        FrameBound(1000, keep=100).feed(b"ERROR\ncontent-length:5000\n\n")
    with pytest.raises(FrameTooLarge, match="headers"):
        FrameBound(1000, keep=100).feed(b"MESSAGE\n" + b"x-header:" + b"y" * 2000)
