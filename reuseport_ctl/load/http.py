"""Just enough HTTP/1.1 response parsing for a load client (pure).

The client needs three things from a response: its status, the worker that
served it (the X-Worker header) and where it ends, so that a keep-alive
connection can carry the next request.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

CHUNKED = -1        # Transfer-Encoding: chunked
UNTIL_CLOSE = -2    # no framing: the body ends when the server closes
MAX_HEAD = 64 * 1024


class HttpError(ValueError):
    """The bytes are not an HTTP/1.x response."""


@dataclass(frozen=True)
class Head:
    status: int
    worker: Optional[str]   # value of X-Worker, if any
    body_start: int         # offset of the body in the buffer
    length: int             # Content-Length, CHUNKED or UNTIL_CLOSE
    close: bool             # the server said Connection: close


def request(path: str, host_header: str, last: bool) -> bytes:
    """A GET; the last one on a connection tells the server we will close."""
    conn = "Connection: close\r\n" if last else ""
    return (f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\n"
            f"User-Agent: reuseport-ctl\r\n{conn}\r\n").encode("latin-1")


def parse_head(buf: bytes | bytearray) -> Optional[Head]:
    """The response head, or None while it is incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD or (len(buf) >= 5 and not buf.startswith(b"HTTP/")):
            raise HttpError("not an HTTP response")
        return None
    # Look up only the headers we use (this runs once per response, in the
    # hot loop); the trailing CRLF kept in `head` ends every header line.
    head = bytes(buf[:end + 2])
    low = head.lower()
    parts = head[:head.find(b"\r\n")].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise HttpError(f"bad status line {head[:60]!r}")
    status = int(parts[1])
    length = UNTIL_CLOSE
    te = _header(head, low, b"transfer-encoding")
    cl = _header(head, low, b"content-length")
    if te is not None and b"chunked" in te.lower():
        length = CHUNKED        # wins over Content-Length (RFC 9112 6.3)
    elif cl is not None:
        if not cl.isdigit():
            raise HttpError(f"bad Content-Length {cl[:20]!r}")
        length = int(cl)
    if status < 200 or status in (204, 304):
        length = 0
    conn = (_header(head, low, b"connection") or b"").lower()
    close = b"close" in conn or (parts[0] == b"HTTP/1.0" and b"keep-alive" not in conn)
    worker = _header(head, low, b"x-worker")
    return Head(status, None if worker is None else worker.decode("latin-1"),
                end + 4, length, close)


def _header(head: bytes, low: bytes, name: bytes) -> Optional[bytes]:
    """Value of the first `name` header (name in lower case), stripped."""
    i = low.find(b"\r\n" + name + b":")
    if i < 0:
        return None
    i += len(name) + 3
    return head[i:head.find(b"\r\n", i)].strip()


def body_end(buf: bytes | bytearray, head: Head) -> Optional[int]:
    """Offset just past the body, or None while it is incomplete (always
    None for UNTIL_CLOSE: only the server's close ends that body)."""
    if head.length >= 0:
        end = head.body_start + head.length
        return end if len(buf) >= end else None
    if head.length == CHUNKED:
        return _chunked_end(buf, head.body_start)
    return None


def _chunked_end(buf: bytes | bytearray, pos: int) -> Optional[int]:
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size_field = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
        try:
            size = int(size_field, 16)
        except ValueError:
            raise HttpError(f"bad chunk size {size_field[:20]!r}") from None
        pos = eol + 2
        if size == 0:
            break
        pos += size
        if len(buf) < pos + 2:
            return None
        if buf[pos:pos + 2] != b"\r\n":
            raise HttpError("chunk not followed by CRLF")
        pos += 2
    while True:     # trailer lines, then an empty line
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        if eol == pos:
            return pos + 2
        pos = eol + 2
