"""`tgfleet render k8s`: the manifests validate against a pinned Kubernetes schema and
say what a bot needs (one pod, Recreate, its memory, a real probe, secrets only in its Secret)."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest
import rsa

from botspec.config import parse
from controller.k8s import (
    BotSource,
    K8sOptions,
    K8sRenderError,
    Secrets,
    manifests,
    to_text,
)

# The schema the manifests are checked against (kubernetes-validate ships it).
KUBERNETES_VERSION = "1.36.0"
TOKEN = "123456:AAbbCCddEEffGGhhIIjjKKllMMnnOOppQQr"
SERVER = {
    "host": "127.0.0.1",
    "port": 8711,
    "dc_id": 2,
    # A key of our own: the bot config checks it loads.
    "public_key": rsa.newkeys(512)[0].save_pkcs1().decode(),
}
DEFAULTS = {"telegram": {"api_id": 1, "server": SERVER}}
SECRETS = Secrets(
    defaults={"telegram": {"api_hash": "0123456789abcdef"}},
    bots={"shop": {"token": TOKEN}, "parked": {"token": TOKEN}},
)
SHOP = BotSource(
    "shop",
    {
        "plugins": ["botrunner.plugins.echo:setup"],
        "settings": {"prefix": "echo: "},
        "memory_limit_mb": 300,
        "health": {"heartbeat_timeout_s": 12, "disconnect_grace_s": 20},
        "credential": "token",
    },
)
PARKED = BotSource("parked", {"credential": "token"}, desired="stopped")


def render(*bots: BotSource, only: str | None = None) -> list[dict[str, Any]]:
    return manifests(list(bots), DEFAULTS, SECRETS, K8sOptions(namespace="bots"), only=only)


def by_kind(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def test_every_manifest_validates_against_the_kubernetes_schema() -> None:
    docs = render(SHOP, PARKED)
    assert {d["kind"] for d in docs} == {
        "Secret",
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
    }
    for doc in docs:
        # Raises ValidationError on anything the schema refuses (strict: no unknown field).
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_catches_a_broken_manifest() -> None:
    deployment = by_kind(render(SHOP), "Deployment", "tgfleet-bot-shop")
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_a_bot_runs_one_pod_with_its_memory_and_probes() -> None:
    deployment = by_kind(render(SHOP), "Deployment", "tgfleet-bot-shop")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    [container] = spec["template"]["spec"]["containers"]
    assert container["command"] == [
        "python",
        "-m",
        "botrunner",
        "/etc/tgfleet/config.json",
    ]
    assert container["resources"]["limits"]["memory"] == "300Mi"
    assert container["resources"]["requests"]["memory"] == "300Mi"
    liveness = container["livenessProbe"]["exec"]["command"]
    assert liveness[:3] == ["python", "-m", "botrunner.alive"]
    assert liveness[liveness.index("--max-age") + 1] == "12"
    assert liveness[liveness.index("--disconnect-grace") + 1] == "20"
    assert "--connected" in container["startupProbe"]["exec"]["command"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TGFLEET_ALIVE_FILE"] == liveness[3]


def test_secrets_are_only_in_the_secret_and_the_config_is_one_the_bot_accepts() -> None:
    docs = render(SHOP)
    secret = by_kind(docs, "Secret", "tgfleet-bot-shop")
    config = parse(secret["stringData"]["config.json"].encode())
    assert config.token == TOKEN
    assert config.telegram.api_hash == "0123456789abcdef"
    assert config.settings == {"prefix": "echo: "}
    assert config.plugins == ("botrunner.plugins.echo:setup",)
    for doc in docs:
        if doc["kind"] != "Secret":
            text = json.dumps(doc)
            assert TOKEN not in text and "0123456789abcdef" not in text


def test_a_stopped_bot_gets_no_pod_and_the_controller_has_a_service() -> None:
    docs = render(SHOP, PARKED)
    assert by_kind(docs, "Deployment", "tgfleet-bot-parked")["spec"]["replicas"] == 0
    service = by_kind(docs, "Service", "tgfleet-controller")
    assert service["spec"]["ports"][0]["port"] == 8710
    controller = by_kind(docs, "Deployment", "tgfleet-controller")
    [container] = controller["spec"]["template"]["spec"]["containers"]
    assert container["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "tgfleet-database"


def test_one_bot_alone() -> None:
    docs = render(SHOP, PARKED, only="parked")
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("Secret", "tgfleet-bot-parked"),
        ("Deployment", "tgfleet-bot-parked"),
    ]
    assert to_text(docs).startswith("---\n{")


@pytest.mark.parametrize(
    ("bots", "secrets", "only", "message"),
    [
        ([SHOP], Secrets(defaults=SECRETS.defaults), None, "no token or session"),
        ([SHOP], Secrets(bots=SECRETS.bots), None, "api_hash missing"),
        ([SHOP], SECRETS, "nobody", "no bot named 'nobody'"),
        ([BotSource("odd-", {})], SECRETS, None, "cannot end with '-'"),
    ],
)
def test_what_cannot_render_is_refused_by_name(
    bots: list[BotSource], secrets: Secrets, only: str | None, message: str
) -> None:
    with pytest.raises(K8sRenderError, match=message):
        manifests(bots, DEFAULTS, secrets, K8sOptions(), only=only)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "must be an object"),
        ({"bots": {"a": {"plugins": []}}}, r"bots\.a\.plugins: not a secret field"),
        ({"defaults": {"token": TOKEN}}, r"defaults\.token: not a secret field"),
        ({"bots": {"a": {"telegram": {"api_id": 3}}}}, "only api_hash"),
    ],
)
def test_a_bad_secrets_file_is_refused_by_field(raw: object, message: str) -> None:
    with pytest.raises(K8sRenderError, match=message):
        Secrets.parse(raw, "secrets.json")


def test_host_picks_the_cluster_s_bots_where_the_api_places_bots() -> None:
    here = BotSource("here", {"credential": "token"}, host="cluster")
    there = BotSource("there", {"credential": "token"}, host="box1")
    secrets = Secrets(defaults=SECRETS.defaults, bots={"here": {"token": TOKEN}})
    docs = manifests([here, there], DEFAULTS, secrets, K8sOptions(), host="cluster")
    bots = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    assert bots == {"tgfleet-controller", "tgfleet-bot-here"}
    # The controller is a host of its own: its circusd holds none of the cluster's bots.
    (controller,) = [
        d for d in docs if d["kind"] == "Deployment" and "controller" in d["metadata"]["name"]
    ]
    env = {
        e["name"]: e.get("value")
        for e in controller["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["TGFLEET_HOST"] == "cluster-controller"
    with pytest.raises(K8sRenderError, match="gives no host for shop"):
        manifests([SHOP], DEFAULTS, SECRETS, K8sOptions(), host="cluster")


def test_the_pod_template_changes_exactly_when_the_bot_s_config_does() -> None:
    def digest(bot: BotSource) -> str:
        deployment = by_kind(render(bot), "Deployment", "tgfleet-bot-shop")
        return str(
            deployment["spec"]["template"]["metadata"]["annotations"]["tgfleet/config-sha256"]
        )

    assert digest(SHOP) == digest(SHOP)  # new bus keys each render, same digest
    changed = BotSource("shop", {**SHOP.own, "settings": {"prefix": "other: "}})
    assert digest(changed) != digest(SHOP)
