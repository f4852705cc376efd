"""A small synchronous client of the HTTP API, for the CLI."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from controller import http1
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
        """The answer's JSON (or text); ApiError for an error answer, ApiUnreachable
        when no answer came."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            answer = http1.request(
                method,
                self.base_url + path,
                headers=headers,
                body=data,
                timeout_s=self.timeout_s,
                cafile=self.cafile,
            )
        except (OSError, ValueError) as exc:  # refused, timed out, TLS, a bad URL
            raise ApiUnreachable(
                f"cannot reach the tgfleet API at {self.base_url} ({exc}); is `tgfleet up` running?"
            ) from None
        if answer.status >= 400:
            try:
                problem = json.loads(answer.body)
            except ValueError:
                problem = None
            if not isinstance(problem, dict):
                text = answer.body.decode("utf-8", "replace")
                problem = {"title": answer.reason, "detail": text}
            raise ApiError(answer.status, problem)
        if answer.content_type == "application/json":
            return json.loads(answer.body) if answer.body else None
        return answer.body.decode("utf-8", "replace")
