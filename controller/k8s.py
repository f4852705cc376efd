"""`tgfleet render k8s`: Kubernetes manifests from the fleet's bot specs.

The specs come from the controller's API (what an operator already has a token
for), merged with the fleet defaults exactly as the controller merges them, and
turned into each bot's ``config.json`` by the same ``runtime_config`` the
controller writes to disk. The API never returns a secret, so tokens, sessions
and ``telegram.api_hash`` come from a secrets file the operator keeps (or a
vault renders); they land in one Secret per bot, never in a Deployment.

Per bot: a Secret (``config.json``) and a Deployment (one replica, ``Recreate``:
never two pods polling one token) running ``python -m botrunner``, its memory
limit and request from ``memory_limit_mb``, a startup probe (logged in to
Telegram within ``startup_timeout_s``) and a liveness probe (heartbeat younger
than ``heartbeat_timeout_s``, Telegram not unreachable past
``disconnect_grace_s``), both reading the file the bot rewrites at every
heartbeat (botrunner/alive.py). For the controller: a Deployment running
`tgfleet up` on an external PostgreSQL, its home on a PersistentVolumeClaim
(``secret.key`` lives there), and a Service for its API.

Pure: ``manifests`` takes plain data and returns plain dicts; ``render_k8s``
fetches from the API and prints. The output is JSON documents separated by
``---`` (JSON is YAML: ``kubectl apply -f`` takes it as it is).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq

from botspec.config import BotConfig, dump
from controller.botfiles import runtime_config
from controller.buskeys import IssuedKey
from controller.home import Home
from controller.spec import deep_merge, effective

# Where things are inside the pods.
POD_HOME = Path("/var/lib/tgfleet")
CONFIG_DIR = "/etc/tgfleet"
ALIVE_FILE_NAME = "alive.json"
API_PORT = 8710
DEFAULT_IMAGE = "tgfleet:0.1.0"
PART_OF = "tgfleet"
CONFIG_ANNOTATION = "tgfleet/config-sha256"
# The secrets a spec can hold, which the API leaves out and the secrets file gives.
SECRET_KEYS = {"token", "session", "telegram"}


class K8sRenderError(ValueError):
    """The manifests cannot be rendered; the message names the bot and the field."""


@dataclass(frozen=True)
class K8sOptions:
    image: str = DEFAULT_IMAGE
    namespace: str | None = None
    # The Secret (key ``url``) holding the controller's PostgreSQL DSN; made by the operator.
    database_secret: str = "tgfleet-database"
    home_storage: str = "1Gi"


@dataclass(frozen=True)
class BotSource:
    """One bot as the API lists it: its own spec (no secrets) and desired state."""

    name: str
    own: Mapping[str, Any]
    desired: str = "running"
    # The host that runs it, where the API has a host per bot (several hosts on one
    # PostgreSQL); None where it has not.
    host: str | None = None


@dataclass(frozen=True)
class Secrets:
    """What the API never returns: ``bots[name]`` and ``defaults`` hold ``token``,
    ``session`` and ``telegram.api_hash``."""

    defaults: Mapping[str, Any] = field(default_factory=dict)
    bots: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: object, where: str) -> Secrets:
        """From the secrets file's JSON: ``{"defaults": {...}, "bots": {"NAME": {...}}}``."""
        if not isinstance(raw, dict) or set(raw) - {"defaults", "bots"}:
            raise K8sRenderError(f"{where}: must be an object with 'defaults' and/or 'bots'")
        defaults = raw.get("defaults", {})
        bots = raw.get("bots", {})
        if not isinstance(bots, dict):
            raise K8sRenderError(f"{where}: 'bots' must be an object of bot names")
        _check_secret_fields(defaults, f"{where}: defaults", allow_credentials=False)
        for name, fields in bots.items():
            _check_secret_fields(fields, f"{where}: bots.{name}", allow_credentials=True)
        return cls(defaults, bots)


def _check_secret_fields(fields: object, where: str, *, allow_credentials: bool) -> None:
    if not isinstance(fields, dict):
        raise K8sRenderError(f"{where}: must be an object")
    allowed = SECRET_KEYS if allow_credentials else {"telegram"}
    for key in set(fields) - allowed:
        raise K8sRenderError(f"{where}.{key}: not a secret field (allowed: {sorted(allowed)})")
    telegram = fields.get("telegram", {})
    if not isinstance(telegram, dict) or set(telegram) - {"api_hash"}:
        raise K8sRenderError(f"{where}.telegram: only api_hash belongs here")


def _k8s_name(bot: str) -> str:
    # Bot names are DNS labels but for a trailing '-', which Kubernetes refuses.
    if bot.endswith("-"):
        raise K8sRenderError(
            f"bot {bot!r}: a Kubernetes object name cannot end with '-'; rename the bot"
        )
    return f"tgfleet-bot-{bot}"


def _labels(component: str, instance: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": component,
        "app.kubernetes.io/instance": instance,
        "app.kubernetes.io/part-of": PART_OF,
    }


def _meta(name: str, labels: dict[str, str], options: K8sOptions) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if options.namespace:
        meta["namespace"] = options.namespace
    return meta


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))


def config_digest(config: BotConfig) -> str:
    """SHA-256 of what the bot runs with, its per-render bus keys left out: the same
    spec renders the same digest."""
    fields = msgspec.structs.asdict(config)
    fields.pop("bus_secret_key")
    fields.pop("bus_server_key")
    return hashlib.sha256(msgspec.json.encode(fields, order="sorted")).hexdigest()


def bot_manifests(
    bot: BotSource,
    defaults: Mapping[str, Any],
    secrets: Secrets,
    options: K8sOptions,
    bus_key: IssuedKey,
) -> list[dict[str, Any]]:
    """The Secret and the Deployment of one bot."""
    name = _k8s_name(bot.name)
    own = {k: v for k, v in bot.own.items() if k not in ("name", "credential")}
    own = deep_merge(own, secrets.bots.get(bot.name, {}))
    merged_defaults = deep_merge(defaults, secrets.defaults)
    try:
        spec = effective(own, merged_defaults)
    except msgspec.ValidationError as exc:
        raise K8sRenderError(f"bot {bot.name!r}: {exc}") from None
    if spec.token is None and spec.session is None:
        raise K8sRenderError(
            f"bot {bot.name!r}: no token or session in the secrets file "
            f"(bots.{bot.name}.token): the API never returns them"
        )
    if spec.telegram.api_id is None or spec.telegram.api_hash is None:
        raise K8sRenderError(
            f"bot {bot.name!r}: telegram.api_id/api_hash missing (the api_hash comes from "
            "the secrets file: defaults.telegram.api_hash or bots.NAME.telegram.api_hash)"
        )
    home = Home(POD_HOME)
    config = runtime_config(home, bot.name, 0, spec, bus_key)
    labels = _labels("tgfleet-bot", bot.name)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(name, labels, options),
        "type": "Opaque",
        "stringData": {"config.json": dump(config).decode()},
    }
    health = spec.health
    alive_file = f"{config.data_dir}/{ALIVE_FILE_NAME}"
    alive = ["python", "-m", "botrunner.alive", alive_file]
    max_age = ["--max-age", f"{health.heartbeat_timeout_s:g}"]
    memory = f"{spec.memory_limit_mb}Mi"
    container = {
        "name": "bot",
        "image": options.image,
        "command": ["python", "-m", "botrunner", f"{CONFIG_DIR}/config.json"],
        "env": [
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "MALLOC_ARENA_MAX", "value": "2"},
            {"name": "HOME", "value": config.data_dir},
            {"name": "TGFLEET_ALIVE_FILE", "value": alive_file},
        ],
        # The controller reserves memory_limit_mb per bot on a host: the same here.
        "resources": {
            "requests": {"memory": memory, "cpu": "50m"},
            "limits": {"memory": memory},
        },
        "startupProbe": {
            "exec": {"command": [*alive, *max_age, "--connected"]},
            "periodSeconds": 2,
            "timeoutSeconds": 5,
            "failureThreshold": _seconds(health.startup_timeout_s / 2),
        },
        "livenessProbe": {
            "exec": {
                "command": [
                    *alive,
                    *max_age,
                    "--disconnect-grace",
                    f"{health.disconnect_grace_s:g}",
                ]
            },
            "periodSeconds": _seconds(health.heartbeat_interval_s * 2),
            "timeoutSeconds": 5,
            "failureThreshold": 2,
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "data", "mountPath": config.data_dir},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, labels, options),
        "spec": {
            # One pod at most, ever: a token polled by two processes loses updates.
            "replicas": 1 if bot.desired == "running" else 0,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels},
            "template": {
                # A changed config changes the pod template: Kubernetes replaces the pod
                # (a changed Secret alone restarts nothing).
                "metadata": {
                    "labels": labels,
                    "annotations": {CONFIG_ANNOTATION: config_digest(config)},
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": _seconds(spec.graceful_timeout_s) + 5,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 10001,
                        "fsGroup": 10001,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "config",
                            "secret": {"secretName": name, "defaultMode": 0o400},
                        },
                        # The Telethon session of a token bot: a new pod logs in again.
                        {"name": "data", "emptyDir": {}},
                    ],
                },
            },
        },
    }
    return [secret, deployment]


def controller_host(cluster: str | None) -> str:
    """The controller's own host name: fixed (a pod's hostname changes with every new
    pod, and the bots placed on the old name would wait for it), and, when the bots of
    host ``cluster`` run as pods, not ``cluster`` itself, or its circusd would take
    those bots and run each twice."""
    return "tgfleet-controller" if cluster is None else f"{cluster}-controller"


def controller_manifests(options: K8sOptions, cluster: str | None = None) -> list[dict[str, Any]]:
    """The controller: its home's claim, its Deployment (`tgfleet up` on the
    PostgreSQL of the ``database_secret``) and its API's Service. With ``cluster`` (the
    host of the bots that run as pods) the controller is a host of its own beside it."""
    name = "tgfleet-controller"
    labels = _labels("tgfleet-controller", "controller")
    home = str(POD_HOME)
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(f"{name}-home", labels, options),
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": options.home_storage}},
        },
    }
    command = ["tgfleet", "up", "--home", home, "--listen", f"0.0.0.0:{API_PORT}"]
    # Inside the cluster network; put TLS (--tls-cert/--tls-key) or a mesh in front for more.
    command.append("--insecure-listen")
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, labels, options),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": 60,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 10001,
                        "fsGroup": 10001,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": "controller",
                            "image": options.image,
                            "command": command,
                            "env": [
                                {
                                    "name": "TGFLEET_DATABASE_URL",
                                    "valueFrom": {
                                        "secretKeyRef": {
                                            "name": options.database_secret,
                                            "key": "url",
                                        }
                                    },
                                },
                                {"name": "TGFLEET_HOST", "value": controller_host(cluster)},
                            ],
                            "ports": [{"name": "api", "containerPort": API_PORT}],
                            "readinessProbe": {
                                "httpGet": {"path": "/readyz", "port": "api"},
                                "periodSeconds": 5,
                            },
                            "livenessProbe": {
                                "httpGet": {"path": "/healthz", "port": "api"},
                                "initialDelaySeconds": 30,
                                "periodSeconds": 10,
                                "failureThreshold": 3,
                            },
                            "resources": {
                                "requests": {"memory": "160Mi", "cpu": "100m"},
                                "limits": {"memory": "512Mi"},
                            },
                            "volumeMounts": [{"name": "home", "mountPath": home}],
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                            },
                        }
                    ],
                    "volumes": [
                        {"name": "home", "persistentVolumeClaim": {"claimName": f"{name}-home"}}
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, labels, options),
        "spec": {
            "selector": labels,
            "ports": [{"name": "api", "port": API_PORT, "targetPort": "api"}],
        },
    }
    return [claim, deployment, service]


def new_bus_key() -> IssuedKey:
    """A bus key pair for a bot in a pod (its controller's public key beside it)."""
    _, bot_secret = zmq.curve_keypair()
    server_public, _ = zmq.curve_keypair()
    return IssuedKey(bot_secret.decode(), server_public.decode())


def manifests(
    bots: Sequence[BotSource],
    defaults: Mapping[str, Any],
    secrets: Secrets,
    options: K8sOptions,
    *,
    only: str | None = None,
    host: str | None = None,
    with_controller: bool = True,
) -> list[dict[str, Any]]:
    """Every manifest: the controller's, then each bot's (or only the bot ``only``;
    with ``host``, only the bots whose host it is: the cluster's own)."""
    chosen = [bot for bot in bots if only is None or bot.name == only]
    if only is not None and not chosen:
        raise K8sRenderError(f"no bot named {only!r}")
    if host is not None:
        unplaced = [bot.name for bot in chosen if bot.host is None]
        if unplaced:
            raise K8sRenderError(
                f"--host {host}: the API gives no host for {', '.join(unplaced)} "
                "(it has no host per bot)"
            )
        chosen = [bot for bot in chosen if bot.host == host]
    out = controller_manifests(options, host) if with_controller and only is None else []
    for bot in sorted(chosen, key=lambda b: b.name):
        out += bot_manifests(bot, defaults, secrets, options, new_bus_key())
    return out


def to_text(documents: Sequence[Mapping[str, Any]]) -> str:
    """JSON documents separated by ``---`` (YAML streams accept JSON documents)."""
    return "".join(f"---\n{json.dumps(doc, indent=2)}\n" for doc in documents)


TWICE_WARNING = (
    "warning: the controller's Deployment runs `tgfleet up`, whose circusd runs every bot "
    "of its database: applied together with these bot Deployments, each bot would run "
    "twice (two pollers of one token). Apply the controller alone, or the bots alone "
    "(--bot NAME), or place the bots on the cluster with a host per bot (--host)."
)


def render_k8s(
    api_get: Any,
    secrets_file: str | None,
    options: K8sOptions,
    only: str | None = None,
    host: str | None = None,
) -> tuple[str, list[str]]:
    """`tgfleet render k8s`: fetch with ``api_get(path)`` (the CLI's API client), render;
    the manifests and the warnings for stderr."""
    listed = api_get("/api/v1/bots")
    defaults = api_get("/api/v1/defaults")
    bots = [
        BotSource(b["name"], b["spec"], b.get("desired", "running"), b.get("host"))
        for b in listed["bots"]
    ]
    secrets = Secrets()
    if secrets_file is not None:
        try:
            raw = json.loads(Path(secrets_file).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise K8sRenderError(f"cannot read the secrets file {secrets_file}: {exc}") from None
        secrets = Secrets.parse(raw, secrets_file)
    documents = manifests(bots, defaults, secrets, options, only=only, host=host)
    together = only is None and host is None and any(d["kind"] == "Secret" for d in documents)
    return to_text(documents), [TWICE_WARNING] if together else []
