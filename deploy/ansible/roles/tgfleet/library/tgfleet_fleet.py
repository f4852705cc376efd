#!/usr/bin/python
"""Ansible module: make a tgfleet fleet's defaults and bots what the inventory declares."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
---
module: tgfleet_fleet
short_description: Declare a tgfleet fleet's defaults and bots through its HTTP API
description:
  - Reads the fleet defaults and every declared bot from the API, and changes only
    what differs from the declaration (PUT defaults, POST a new bot, PATCH a changed
    one, start, stop or destroy it). Reports changed only when it changed something.
  - The API never returns secrets (token, session, telegram.api_hash), so they cannot
    be compared; they are sent when a bot is created, when the defaults are written
    anyway, and always with I(update_secrets).
  - Fields a bot's declaration leaves out are left as they are (a JSON merge patch);
    declare a field as null to reset it to the fleet default.
  - A bot's C(host) (the controller that runs it) is compared with the host the API
    shows; a different one moves the bot there (PATCH host). Null means the host whose
    API answers.
options:
  api:
    description: The API's base URL, e.g. http://127.0.0.1:8710 or https://…
    type: str
    required: true
  ca_file:
    description:
      - The certificate (PEM) an https API must present, e.g. the controller's own
        --tls-cert; unset, the system's certificate authorities.
    type: path
  token_file:
    description: A file holding an API token with the admin scope (the fleet's admin.token).
    type: path
    required: true
  defaults:
    description: The fleet defaults (PUT /api/v1/defaults); empty leaves them alone.
    type: dict
    default: {}
  bots:
    description: Bot specs, each with its name and optionally state (running, stopped, absent).
    type: list
    elements: dict
    default: []
  update_secrets:
    description: Send every declared secret again (each such bot restarts).
    type: bool
    default: false
author: tgfleet
"""

EXAMPLES = r"""
- name: Declare the bots
  tgfleet_fleet:
    api: http://127.0.0.1:8710
    token_file: /srv/tgfleet/admin.token
    defaults: {telegram: {api_id: 12345, api_hash: "{{ vault_api_hash }}"}}
    bots:
      - name: shop
        token: "{{ vault_shop_token }}"
        plugins: [mybot.handlers:setup]
"""

RETURN = r"""
actions:
  description: What was done (or would be, in check mode), one line each.
  type: list
  elements: str
  returned: always
"""

SECRET_FIELDS = ("token", "session")
STATES = ("running", "stopped", "absent")


class ApiFailure(Exception):
    pass


class Api:
    def __init__(self, base: str, token: str, ca_file: str | None = None) -> None:
        self.base = base.rstrip("/")
        self.token = token
        self.context = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self._host: str | None = None

    def answering_host(self) -> str:
        """The host whose controller answers this API (where a null ``host`` places a bot)."""
        if self._host is None:
            self._host = str(self.ok("GET", "/api/v1/status")["controller"]["host"])
        return self._host

    def call(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60, context=self.context) as answer:
                raw = answer.read()
                return answer.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                problem = json.loads(raw)
            except ValueError:
                problem = {"detail": raw.decode("utf-8", "replace")}
            return exc.code, problem

    def ok(self, method: str, path: str, body: object = None) -> Any:
        status, answer = self.call(method, path, body)
        if status >= 400:
            errors = "; ".join(
                f"{e.get('field') or '(body)'}: {e.get('message')}"
                for e in (answer or {}).get("errors", [])
            )
            detail = (answer or {}).get("detail") or (answer or {}).get("title")
            raise ApiFailure(
                f"{method} {path}: HTTP {status}: {detail}" + (f" ({errors})" if errors else "")
            )
        return answer


def without_secrets(spec: dict[str, Any]) -> dict[str, Any]:
    """What of a declaration the API shows back: no token, session or api_hash."""
    public = {k: v for k, v in spec.items() if k not in SECRET_FIELDS}
    telegram = public.get("telegram")
    if isinstance(telegram, dict) and "api_hash" in telegram:
        public["telegram"] = {k: v for k, v in telegram.items() if k != "api_hash"}
    return public


def differs(declared: Any, current: Any) -> bool:
    """Whether merge-patching ``current`` with ``declared`` would change it."""
    if isinstance(declared, dict):
        if not isinstance(current, dict):
            return True
        for key, value in declared.items():
            if value is None:
                if key in current:
                    return True
            elif key not in current or differs(value, current[key]):
                return True
        return False
    return bool(declared != current)


def has_secrets(spec: dict[str, Any]) -> bool:
    return any(k in spec for k in SECRET_FIELDS) or "api_hash" in (spec.get("telegram") or {})


def plan_defaults(
    api: Api, declared: dict[str, Any], update_secrets: bool
) -> tuple[list[tuple[str, str, Any]], dict[str, Any], dict[str, Any]]:
    current = api.ok("GET", "/api/v1/defaults")
    public = without_secrets(declared)
    if differs(public, current) or (update_secrets and has_secrets(declared)):
        # PUT replaces: keep what the declaration leaves out, as a merge patch would.
        body = merge(current, declared)
        return [("PUT", "/api/v1/defaults", body)], current, merge(current, public)
    return [], current, current


def merge(base: Any, patch: Any) -> Any:
    if not isinstance(patch, dict) or not isinstance(base, dict):
        return patch
    merged = dict(base)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge(merged.get(key), value)
    return merged


def plan_bot(
    api: Api, declared: dict[str, Any], update_secrets: bool
) -> tuple[list[tuple[str, str, Any]], Any, Any]:
    name = declared["name"]
    state = declared.get("state", "running")
    # The API shows a bot's host beside its spec, not in it: compared on its own.
    spec = {k: v for k, v in declared.items() if k not in ("name", "state", "host")}
    status, current = api.call("GET", f"/api/v1/bots/{name}")
    if status == 404:
        if state == "absent":
            return [], None, None
        body = {"name": name, **spec}
        if declared.get("host") is not None:
            body["host"] = declared["host"]
        if state == "stopped":
            body["autostart"] = body.get("autostart", False)
        steps = [("POST", "/api/v1/bots", body)]
        if state == "stopped" and body["autostart"]:
            steps.append(("POST", f"/api/v1/bots/{name}/stop", None))
        after = {"name": name, "state": state, "spec": without_secrets(spec)}
        if "host" in declared:
            after["host"] = declared["host"] or api.answering_host()
        return steps, None, after
    if status >= 400:
        raise ApiFailure(f"GET /api/v1/bots/{name}: HTTP {status}: {current}")
    before = {
        "name": name,
        "state": current["desired"],
        "host": current.get("host"),
        "spec": current["spec"],
    }
    if state == "absent":
        return [("DELETE", f"/api/v1/bots/{name}", None)], before, None
    steps = []
    public = without_secrets(spec)
    host = current.get("host")
    if "host" in declared:
        host = declared["host"] or api.answering_host()
    if (
        differs(public, current["spec"])
        or host != current.get("host")
        or (update_secrets and has_secrets(spec))
    ):
        patch = dict(spec) if update_secrets else dict(public)
        if host != current.get("host"):
            patch["host"] = host  # a move: the old host stops it before the new one starts it
        steps.append(("PATCH", f"/api/v1/bots/{name}", patch))
    if current["desired"] != state:
        steps.append(
            ("POST", f"/api/v1/bots/{name}/{'start' if state == 'running' else 'stop'}", None)
        )
    after = {"name": name, "state": state, "host": host, "spec": merge(current["spec"], public)}
    return steps, before, after


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "api": {"type": "str", "required": True},
            "ca_file": {"type": "path", "default": None},
            "token_file": {"type": "path", "required": True, "no_log": False},
            "defaults": {"type": "dict", "default": {}},
            "bots": {"type": "list", "elements": "dict", "default": []},
            "update_secrets": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    params = module.params
    # Secrets never show in the output (diffs, -v, the invocation echoed back).
    for spec in [params["defaults"], *params["bots"]]:
        for value in (
            spec.get("token"),
            spec.get("session"),
            (spec.get("telegram") or {}).get("api_hash"),
        ):
            if isinstance(value, str) and value:
                module.no_log_values.add(value)
    for index, bot in enumerate(params["bots"]):
        if not isinstance(bot.get("name"), str):
            module.fail_json(msg=f"bots[{index}].name: every bot needs a name")
        if bot.get("host") is not None and not isinstance(bot["host"], str):
            module.fail_json(msg=f"bots[{index}].host: a host name (a string) or null")
        if bot.get("state", "running") not in STATES:
            module.fail_json(
                msg=f"bots[{index}].state: one of {', '.join(STATES)}, not {bot.get('state')!r}"
            )
    try:
        with open(params["token_file"], encoding="utf-8") as handle:
            token = handle.read().strip()
    except OSError as exc:
        if module.check_mode:
            module.exit_json(changed=True, actions=[f"the fleet is not set up yet ({exc})"])
        module.fail_json(msg=f"cannot read the API token: {exc}")
    api = Api(params["api"], token, params["ca_file"])
    steps: list[tuple[str, str, Any]] = []
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    try:
        if params["defaults"]:
            planned, was, will = plan_defaults(api, params["defaults"], params["update_secrets"])
            steps += planned
            before["defaults"], after["defaults"] = was, will
        for bot in params["bots"]:
            planned, was, will = plan_bot(api, bot, params["update_secrets"])
            steps += planned
            before[bot["name"]], after[bot["name"]] = was, will
        if not module.check_mode:
            for method, path, body in steps:
                api.ok(method, path, body)
    except (ApiFailure, urllib.error.URLError, OSError) as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(
        changed=bool(steps),
        actions=[f"{method} {path}" for method, path, _ in steps],
        diff={
            "before": json.dumps(before, indent=2, sort_keys=True) + "\n",
            "after": json.dumps(after, indent=2, sort_keys=True) + "\n",
        },
    )


if __name__ == "__main__":
    main()
