"""The CLI's hand-written HTTP/1.0 request, against a real HTTP server on loopback."""

import http.server
import json
import re
import threading
from collections.abc import Iterator

import pytest

from controller import http1
from controller.client import ApiClient, ApiError, ApiUnreachable


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/json":
            self.reply(200, "application/json; charset=utf-8", b'{"bots": []}')
        elif self.path == "/big":
            self.reply(200, "text/plain", b"x" * 300_000)
        else:
            problem = {"title": "Not Found", "detail": f"no {self.path}", "errors": []}
            self.reply(404, "application/problem+json", json.dumps(problem).encode())

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        echoed = {
            "body": json.loads(self.rfile.read(length)),
            "auth": self.headers["Authorization"],
            "type": self.headers["Content-Type"],
        }
        self.reply(201, "application/json", json.dumps(echoed).encode())

    def reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_a_json_answer_a_long_body_and_an_error(server: str) -> None:
    answer = http1.request("GET", server + "/json")
    assert (answer.status, answer.content_type, answer.body) == (
        200,
        "application/json",
        b'{"bots": []}',
    )
    assert len(http1.request("GET", server + "/big").body) == 300_000
    assert http1.request("GET", server + "/nothing").status == 404


def test_the_api_client_sends_json_and_its_token_and_raises_problems(server: str) -> None:
    client = ApiClient(server, "tgf_secret")
    assert client.request("POST", "/echo", {"name": "shop"}) == {
        "body": {"name": "shop"},
        "auth": "Bearer tgf_secret",
        "type": "application/json",
    }
    with pytest.raises(ApiError) as refused:
        client.request("GET", "/missing")
    assert refused.value.status == 404 and str(refused.value) == "no /missing"


def test_nobody_listening_is_unreachable() -> None:
    with pytest.raises(
        ApiUnreachable, match=re.escape("cannot reach the tgfleet API at http://127.0.0.1:9")
    ):
        ApiClient("http://127.0.0.1:9", None).request("GET", "/healthz")


@pytest.mark.parametrize(
    ("url", "parts"),
    [
        ("http://127.0.0.1:8710/api/v1/bots?x=1", ("http", "127.0.0.1", 8710, "/api/v1/bots?x=1")),
        ("https://fleet.example", ("https", "fleet.example", 443, "/")),
        ("http://[::1]:8710/healthz", ("http", "::1", 8710, "/healthz")),
    ],
)
def test_urls(url: str, parts: tuple[str, str, int, str]) -> None:
    assert http1.split_url(url) == parts


@pytest.mark.parametrize(
    "url", ["ftp://host/", "127.0.0.1:8710", "http://user:pw@host/", "http:///x"]
)
def test_urls_it_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        http1.split_url(url)


@pytest.mark.parametrize(
    ("raw", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n3;x=y\r\n!!!\r\n0\r\n\r\n",
            b"ok!!!",
        ),
    ],
)
def test_answers(raw: bytes, body: bytes) -> None:
    assert http1.parse_answer(raw).body == body


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nok\r\n",
    ],
)
def test_answers_that_are_not_whole_are_errors(raw: bytes) -> None:
    with pytest.raises(http1.HttpError):
        http1.parse_answer(raw)
