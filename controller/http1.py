"""One HTTP/1.0 request over a socket: all the CLI and `tgfleet up` need of HTTP.

urllib.request brings http.client, the email package and ssl: ~40 ms of every
`tgfleet` command on an idle machine, far more on a busy one, and ~2 MB in the
resident `tgfleet up`. Our API is our own aiohttp server on a known address, so
a request is written by hand: HTTP/1.0, so that the server ends the answer by
closing the connection (no keep-alive, no chunked bodies to decode); ssl is
imported only for an https URL.
"""

from __future__ import annotations

import socket
from typing import NamedTuple

MAX_ANSWER = 64 * 2**20  # a log tail or the OpenAPI document fit many times over


class Answer(NamedTuple):
    status: int
    reason: str
    headers: dict[str, str]  # names in lower case
    body: bytes

    @property
    def content_type(self) -> str:
        """The media type alone (``application/json``), lower case."""
        return self.headers.get("content-type", "").split(";")[0].strip().lower()


class HttpError(OSError):
    """No answer that parses: refused, timed out, cut short or not HTTP."""


def split_url(url: str) -> tuple[str, str, int, str]:
    """``scheme, host, port, path`` of an http(s) URL; ValueError for anything else."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https"):
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    authority, _, path = rest.partition("/")
    if "@" in authority:
        raise ValueError(f"{url!r}: credentials in the URL are not supported")
    host, port = authority, 443 if scheme == "https" else 80
    if authority.startswith("["):  # [::1]:8710
        host, _, after = authority[1:].partition("]")
        if after.startswith(":"):
            port = int(after[1:])
    elif authority.count(":") == 1:
        host, _, number = authority.partition(":")
        port = int(number)
    if not host:
        raise ValueError(f"{url!r} has no host")
    return scheme, host, port, "/" + path


def request(
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout_s: float = 60.0,
    cafile: str | None = None,
    verify: bool = True,
) -> Answer:
    """Send one request and read the whole answer. ``cafile``: the certificate an
    https server must present (else the system's authorities); ``verify=False``
    checks none (a liveness probe)."""
    scheme, host, port, path = split_url(url)
    shown_host = f"[{host}]" if ":" in host else host
    lines = [f"{method} {path} HTTP/1.0", f"Host: {shown_host}:{port}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
    try:
        # An ASCII name as bytes: a str would go through the idna codec (and its imports).
        address = (host.encode("ascii") if host.isascii() else host, port)
        with socket.create_connection(address, timeout=timeout_s) as raw:  # type: ignore[arg-type]
            conn = raw
            if scheme == "https":
                import ssl

                context = ssl.create_default_context(cafile=cafile)
                if not verify:
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                conn = context.wrap_socket(raw, server_hostname=host)
            conn.sendall(data)
            chunks: list[bytes] = []
            size = 0
            while chunk := conn.recv(65536):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_ANSWER:
                    raise HttpError(f"the answer of {url} exceeds {MAX_ANSWER} bytes")
            if conn is not raw:
                conn.close()
    except TimeoutError:
        raise HttpError(f"{url}: timed out after {timeout_s} s") from None
    return parse_answer(b"".join(chunks), url)


def parse_answer(raw: bytes, url: str = "") -> Answer:
    """An HTTP/1.x answer read to its end; HttpError when it is not one."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise HttpError(f"{url}: no complete HTTP answer ({len(raw)} bytes)")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise HttpError(f"{url}: not an HTTP answer: {status_line[:80]!r}")
    headers = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":  # not for 1.0, but legal
        body = _dechunk(body, url)
    length = headers.get("content-length")
    if length is not None and length.isdigit() and len(body) < int(length):
        raise HttpError(f"{url}: the answer was cut short ({len(body)} of {length} bytes)")
    return Answer(int(code), reason, headers, body)


def _dechunk(body: bytes, url: str) -> bytes:
    parts: list[bytes] = []
    at = 0
    while True:
        line_end = body.find(b"\r\n", at)
        size_text = body[at:line_end].split(b";")[0].strip() if line_end >= 0 else b""
        try:
            size = int(size_text, 16)
        except ValueError:
            raise HttpError(f"{url}: a bad chunk size {size_text[:20]!r}") from None
        if size == 0:
            return b"".join(parts)
        start = line_end + 2
        if len(body) < start + size:
            raise HttpError(f"{url}: the answer was cut short in a chunk")
        parts.append(body[start : start + size])
        at = start + size + 2
