"""A small synchronous client of the HTTP API, for the CLI."""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from controller.home import Home
from controller.settings import DEFAULT_LISTEN, ControllerSettings, SettingsError


class ApiError(Exception):
    """The API refused a request; carries its problem document."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(problem.get("detail") or problem.get("title") or f"HTTP {status}")
        self.status = status
        self.problem = problem


class ApiUnreachable(Exception):
    pass


@dataclass(frozen=True)
class ApiClient:
    base_url: str
    token: str | None
    timeout_s: float = 60.0
    #: The certificate an HTTPS API must present (its own, usually self-signed);
    #: None: the system's trusted authorities.
    cafile: str | None = None

    @classmethod
    def discover(cls, home: Home, api: str | None = None, token: str | None = None) -> ApiClient:
        """The API's URL and a token: given, else from the environment, else from the home dir."""
        url = api or os.environ.get("TGFLEET_API")
        cafile = os.environ.get("TGFLEET_CA") or None
        try:
            settings: ControllerSettings | None = ControllerSettings.load(home)
        except SettingsError:
            settings = None
        if settings is not None and settings.tls_cert and cafile is None:
            cafile = settings.tls_cert
        if not url:
            if settings is not None:
                url = settings.api_url
            else:
                url = f"http://{os.environ.get('TGFLEET_LISTEN', DEFAULT_LISTEN)}"
        secret = token or os.environ.get("TGFLEET_TOKEN")
        if not secret and home.admin_token.exists():
            secret = home.admin_token.read_text(encoding="utf-8").strip()
        return cls(url.rstrip("/"), secret, cafile=cafile)

    def request(self, method: str, path: str, body: object | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            context = ssl.create_default_context(cafile=self.cafile) if self.cafile else None
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=context) as answer:
                raw = answer.read()
                if answer.headers.get_content_type() == "application/json":
                    return json.loads(raw) if raw else None
                return raw.decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                problem = json.loads(raw)
            except json.JSONDecodeError:
                problem = {"title": exc.reason, "detail": raw.decode("utf-8", "replace")}
            raise ApiError(exc.code, problem) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ApiUnreachable(
                f"cannot reach the tgfleet API at {self.base_url} ({exc}); is `tgfleet up` running?"
            ) from None
