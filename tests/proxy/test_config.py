"""Tests for superagent/proxy/config.py: the proxy TOML file and the snapshot wire form."""

from __future__ import annotations

import copy
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from superagent.errors import ConfigError
from superagent.httprules import DEFAULT_MAX_BODY
from superagent.proxy.config import (
    ProxyConfig,
    config_from_document,
    load_config,
    snapshot_from_wire,
    snapshot_to_wire,
)
from superagent.proxy.snapshot import (
    AppRoute,
    ColdStart,
    Instance,
    Listener,
    RoutingSnapshot,
    ServerSettings,
    Timeouts,
)

FULL_TOML = """
[proxy]
listen = ["127.0.0.1:8080", "[::1]:8081"]
dedicated_host = "127.0.0.2"
parser = "h11"
workers = 4
admin = "127.0.0.1:9911"
grace = "12s"
header_timeout = "5s"
keepalive_timeout = "1m"
max_header_bytes = "32K"
max_headers = 50
max_request_line = "4K"
max_connections = 500
trusted_proxies = ["10.0.0.0/8", "fd00::/8", "192.168.1.7"]
access_log = false
pool_idle_timeout = "2500ms"
pool_max_idle = 8
merge_slashes = true
path_policy = "reject"

[apps.web]
prefix = "/web/"
strip_prefix = true
instances = ["127.0.0.1:9000", { id = "web-b", address = "[::1]:9001" }]
max_body = "1M"
min_body_rate = "2K"
upgrades = ["WebSocket", "foo/2"]
retries = 1

[apps.web.timeouts]
connect = "1s"
first_byte = "30s"
idle = "45s"
total = "2m"
websocket_idle = "1h"
body_window = "5s"
body = "90s"

[apps.api]
hosts = ["API.example.com", "*.api.example.com"]
instances = [{ address = "127.0.0.1:9100" }]

[apps.admin]
port = 9443
instances = ["127.0.0.1:9200"]
"""

MINIMAL: dict[str, Any] = {
    "apps": {"web": {"prefix": "/web", "instances": ["127.0.0.1:9000"]}},
}


def write(tmp_path: Path, text: str) -> str:
    """Write ``text`` as a config file and return its path."""
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    return str(path)


def load_doc(doc: dict[str, Any], source: str = "proxy.toml") -> tuple[ProxyConfig,
                                                                       RoutingSnapshot]:
    """``config_from_document`` with a fixed source name."""
    return config_from_document(doc, source=source, version=1)


def error_of(doc: dict[str, Any]) -> ConfigError:
    """The ConfigError raised for ``doc``."""
    with pytest.raises(ConfigError) as info:
        load_doc(doc)
    return info.value


def test_load_full_config(tmp_path: Path) -> None:
    """Every setting of a complete file is read into ProxyConfig and RoutingSnapshot."""
    process, snap = load_config(write(tmp_path, FULL_TOML))
    assert process == ProxyConfig(parser="h11", workers=4, admin=("127.0.0.1", 9911), grace=12.0)
    assert process.worker_count() == 4
    assert snap.version == 1
    assert snap.listeners == (
        Listener(host="127.0.0.1", port=8080),
        Listener(host="::1", port=8081),
        Listener(host="127.0.0.2", port=9443, app="admin"),
    )
    assert snap.settings == ServerSettings(
        header_timeout=5.0, keepalive_timeout=60.0, max_header_bytes=32 * 1024, max_headers=50,
        max_request_line=4096, max_connections=500,
        trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"),
                         ipaddress.ip_network("192.168.1.7/32")),
        access_log=False, pool_idle_timeout=2.5, pool_max_idle=8, merge_slashes=True,
        path_policy="reject")
    web, api, admin = snap.apps
    assert web == AppRoute(
        name="web",
        instances=(Instance(id="127.0.0.1:9000", host="127.0.0.1", port=9000),
                   Instance(id="web-b", host="::1", port=9001)),
        prefix="/web", strip_prefix=True, max_body=1024 * 1024, retries=1,
        min_body_rate=2048, upgrades=("websocket", "foo/2"),
        timeouts=Timeouts(connect=1.0, first_byte=30.0, idle=45.0, total=120.0,
                          websocket_idle=3600.0, body_window=5.0, body=90.0))
    assert api.hosts == ("api.example.com", "*.api.example.com")
    assert api.prefix is None and api.port is None
    assert api.instances == (Instance(id="127.0.0.1:9100", host="127.0.0.1", port=9100),)
    assert admin.port == 9443
    assert snap.instance_ids() == {"127.0.0.1:9000", "web-b", "127.0.0.1:9100",
                                   "127.0.0.1:9200"}


def test_defaults() -> None:
    """A file with one app gets the documented defaults everywhere else."""
    process, snap = load_doc(copy.deepcopy(MINIMAL))
    assert process == ProxyConfig()
    assert process.parser == "httptools"
    assert process.admin == ("127.0.0.1", 9901)
    assert process.grace == 30.0
    assert snap.listeners == (Listener(host="0.0.0.0", port=8080),)
    assert snap.settings == ServerSettings()
    (web,) = snap.apps
    assert web.strip_prefix is False
    assert web.hosts == ()
    assert web.port is None
    assert web.max_body == DEFAULT_MAX_BODY
    assert web.retries == 2
    assert web.timeouts == Timeouts()


def test_empty_document_is_valid() -> None:
    """No apps at all is a valid (if useless) configuration."""
    process, snap = load_doc({})
    assert process == ProxyConfig()
    assert snap.apps == ()


def test_admin_off() -> None:
    """``admin = "off"`` or an empty string disables the admin listener."""
    for value in ("off", ""):
        process, _ = load_doc({"proxy": {"admin": value}})
        assert process.admin is None


def test_dedicated_host_defaults_to_first_shared_listener() -> None:
    """Dedicated ports listen on the first shared listener's host unless told otherwise."""
    doc = {"proxy": {"listen": ["10.1.2.3:80"]},
           "apps": {"p": {"port": 9000, "instances": ["127.0.0.1:1"]}}}
    _, snap = load_doc(doc)
    assert snap.listeners[-1] == Listener(host="10.1.2.3", port=9000, app="p")


@pytest.mark.parametrize(
    ("prefix", "normalised"),
    [("/", "/"), ("/a/", "/a"), ("//a//b/", "/a/b"), ("/a/./b/../c", "/a/c"), ("/%61pi", "/api")],
)
def test_prefix_is_normalised(prefix: str, normalised: str) -> None:
    """Prefixes are normalised like request paths and lose their trailing slash."""
    _, snap = load_doc({"apps": {"x": {"prefix": prefix}}})
    assert snap.apps[0].prefix == normalised


def test_full_config_round_trips_through_wire(tmp_path: Path) -> None:
    """snapshot_from_wire(snapshot_to_wire(s)) == s, keeping the version, through JSON."""
    _, snap = load_config(write(tmp_path, FULL_TOML))
    wire = snapshot_to_wire(snap)
    assert wire["version"] == 1
    back = snapshot_from_wire(json.loads(json.dumps(wire)))
    assert back == snap


def test_round_trip_keeps_other_versions() -> None:
    """The wire form carries the version the snapshot was built with."""
    _, snap = config_from_document(copy.deepcopy(MINIMAL), source="x", version=42)
    back = snapshot_from_wire(snapshot_to_wire(snap))
    assert back.version == 42
    assert back == snap


def test_hand_built_snapshot_round_trips() -> None:
    """A snapshot built directly (as the agent does) survives the wire form."""
    snap = RoutingSnapshot(
        version=7,
        listeners=(Listener(host="::", port=80), Listener(host="::", port=8443, app="b")),
        apps=(
            AppRoute(name="a", instances=(Instance(id="i1", host="10.0.0.1", port=1),),
                     prefix="/", hosts=("*.a.test",), max_body=0, retries=0,
                     timeouts=Timeouts(total=0.0, connect=0.5)),
            AppRoute(name="b", instances=(), port=8443),
        ),
        settings=ServerSettings(trusted_proxies=(ipaddress.ip_network("::1/128"),)),
    )
    assert snapshot_from_wire(json.loads(json.dumps(snapshot_to_wire(snap)))) == snap


@pytest.mark.parametrize("key", ["parser", "workers", "admin", "grace"])
def test_process_keys_rejected_in_wire_snapshot(key: str) -> None:
    """Process settings are not part of a snapshot: the wire form refuses them by name."""
    _, snap = load_doc(copy.deepcopy(MINIMAL))
    wire = snapshot_to_wire(snap)
    wire["proxy"][key] = {"parser": "h11", "workers": 2, "admin": "off", "grace": "1s"}[key]
    with pytest.raises(ConfigError) as info:
        snapshot_from_wire(wire)
    assert info.value.source == "snapshot"
    assert info.value.key == f"proxy.{key}"
    assert "unknown key" in str(info.value)


def test_wire_snapshot_requires_version() -> None:
    """A wire snapshot without a version is refused."""
    wire = snapshot_to_wire(load_doc(copy.deepcopy(MINIMAL))[1])
    del wire["version"]
    with pytest.raises(ConfigError) as info:
        snapshot_from_wire(wire)
    assert info.value.key == "version"


def with_changes(**paths: Any) -> dict[str, Any]:
    """MINIMAL plus values set at dotted paths (``apps__web__x`` is ``apps.web.x``)."""
    doc = copy.deepcopy(MINIMAL)
    for dotted, value in paths.items():
        keys = dotted.split("__")
        node = doc
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return doc


INVALID_DOCUMENTS = [
        (with_changes(proxy__lisen=["1.2.3.4:80"]), "proxy.lisen", "unknown key"),
        (with_changes(bogus=1), "bogus", "unknown key"),
        (with_changes(apps__web__prefx="/w"), "apps.web.prefx", "unknown key"),
        (with_changes(apps__web__timeouts__conect="1s"), "apps.web.timeouts.conect",
         "unknown key"),
        (with_changes(apps__web__timeouts__connect="5 parsecs"), "apps.web.timeouts.connect",
         "duration"),
        (with_changes(apps__web__timeouts__idle="0s"), "apps.web.timeouts.idle",
         "greater than zero"),
        (with_changes(proxy__header_timeout="soon"), "proxy.header_timeout", "duration"),
        (with_changes(proxy__keepalive_timeout=0), "proxy.keepalive_timeout",
         "greater than zero"),
        (with_changes(proxy__max_header_bytes="big"), "proxy.max_header_bytes", "size"),
        (with_changes(proxy__max_headers=0), "proxy.max_headers", "at least 1"),
        (with_changes(proxy__parser="fast"), "proxy.parser", "one of"),
        (with_changes(proxy__workers=-1), "proxy.workers", "at least 0"),
        (with_changes(proxy__access_log="yes"), "proxy.access_log", "true or false"),
        (with_changes(proxy__trusted_proxies=["10.0.0.0/33"]), "proxy.trusted_proxies",
         "not an IP network"),
        (with_changes(proxy__listen=["8080"]), "proxy.listen", "host:port"),
        (with_changes(proxy__listen=["a:0"]), "proxy.listen", "host:port"),
        (with_changes(proxy__listen=["a:65536"]), "proxy.listen", "host:port"),
        (with_changes(proxy__listen=["a:1", "b:1"]), "proxy.listen", "listed twice"),
        (with_changes(proxy__admin="localhost"), "proxy.admin", "host:port"),
        (with_changes(apps__web__instances=["nohost"]), "apps.web.instances[0]", "host:port"),
        (with_changes(apps__web__instances=["127.0.0.1:1", "[::1]"]), "apps.web.instances[1]",
         "host:port"),
        (with_changes(apps__web__instances=[{"address": "x:y"}]),
         "apps.web.instances[0].address", "host:port"),
        (with_changes(apps__web__instances=[{"adress": "a:1"}]),
         "apps.web.instances[0].address", "required"),
        (with_changes(apps__web__instances=[{"address": "a:1", "weight": 2}]),
         "apps.web.instances[0].weight", "unknown key"),
        (with_changes(apps__web__instances="a:1"), "apps.web.instances", "expected a list"),
        (with_changes(apps__web__instances=["a:1", {"id": "a:1", "address": "b:2"}]),
         "apps.web.instances", "unique"),
        (with_changes(apps__web__prefix="web"), "apps.web.prefix", "start with"),
        (with_changes(apps__web__prefix="/a%2Fb"), "apps.web.prefix", "plain path"),
        (with_changes(apps__web__hosts=["bad host"]), "apps.web.hosts", "not a host"),
        (with_changes(apps__web__port=70000), "apps.web.port", "at most 65535"),
        (with_changes(apps__web__retries=11), "apps.web.retries", "at most 10"),
        (with_changes(apps__web__max_body="lots"), "apps.web.max_body", "size"),
        (with_changes(apps__web__min_body_rate="slow"), "apps.web.min_body_rate", "size"),
        (with_changes(apps__web__upgrades=["h2c"]), "apps.web.upgrades", "h2c cannot"),
        (with_changes(apps__web__upgrades=["web socket"]), "apps.web.upgrades",
         "not a protocol"),
        (with_changes(apps__web__timeouts={"body_window": "0"}),
         "apps.web.timeouts.body_window", "greater than zero"),
        (with_changes(proxy__path_policy="strict"), "proxy.path_policy", "one of"),
        (with_changes(proxy__merge_slashes="no"), "proxy.merge_slashes", "true or false"),
        (with_changes(apps__web__strip_prefix=1), "apps.web.strip_prefix", "true or false"),
        (with_changes(apps__web=5), "apps.web", "expected a table"),
        (with_changes(apps__bad__name={"prefix": "/x"}), "apps.bad.name", "unknown key"),
        (with_changes(**{"apps__-x": {"prefix": "/x"}}), "apps.-x", "app names"),
        (with_changes(apps__web={"instances": ["127.0.0.1:1"]}), "apps.web", "no route"),
        (with_changes(apps__other={"prefix": "/web/"}), "apps.other.prefix", "already routed"),
        (with_changes(apps__web__hosts=["a.example.com"],
                      apps__other={"hosts": ["A.example.com."]}), "apps.other.hosts",
         "already routed"),
        (with_changes(apps__web__port=9000, apps__other={"port": 9000}), "apps.other.port",
         "already used by app 'web'"),
        (with_changes(apps__other={"port": 8080}), "apps.other.port",
         "already used by a shared listener"),
]


@pytest.mark.parametrize(("doc", "key", "fragment"), INVALID_DOCUMENTS,
                         ids=[f"{key}-{fragment}" for _, key, fragment in INVALID_DOCUMENTS])
def test_validation_errors_name_file_and_key(doc: dict[str, Any], key: str, fragment: str
                                             ) -> None:
    """Every invalid setting raises ConfigError naming the file and the dotted key."""
    err = error_of(doc)
    assert err.source == "proxy.toml"
    assert err.key == key
    assert fragment in str(err)
    assert str(err).startswith(f"proxy.toml: {key}: ")


def test_errors_from_a_file_name_the_file(tmp_path: Path) -> None:
    """load_config reports the path it was given."""
    path = write(tmp_path, '[proxy]\nlisten = ["127.0.0.1:8080"]\nworkers = "many"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == path
    assert info.value.key == "proxy.workers"


def test_invalid_toml_file_names_the_file(tmp_path: Path) -> None:
    """A syntax error in the file is a ConfigError naming it."""
    path = write(tmp_path, "[apps.web\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == path


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    """A missing file is a ConfigError naming it."""
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == path


def test_wire_errors_name_snapshot_and_key() -> None:
    """Validation errors in a wire snapshot name "snapshot" and the key."""
    wire = snapshot_to_wire(load_doc(copy.deepcopy(MINIMAL))[1])
    wire["apps"]["web"]["timeouts"]["idle"] = "never"
    with pytest.raises(ConfigError) as info:
        snapshot_from_wire(wire)
    assert info.value.source == "snapshot"
    assert info.value.key == "apps.web.timeouts.idle"


def test_a_cold_block_round_trips_and_bad_values_are_named() -> None:
    """An app's scale-to-zero block survives the wire form; a bad state or queue is
    refused naming the key."""
    cold = ColdStart(state="failed", reason="exit 3", queue=7, wait=12.5, wake="/run/w.sock")
    snap = RoutingSnapshot(version=3, listeners=(Listener(host="127.0.0.1", port=80),),
                           apps=(AppRoute(name="a", instances=(), prefix="/a", cold=cold),))
    wire = json.loads(json.dumps(snapshot_to_wire(snap)))
    assert snapshot_from_wire(wire) == snap
    for key, value in (("state", "asleep"), ("queue", 0), ("wait", "0")):
        bad = copy.deepcopy(wire)
        bad["apps"]["a"]["cold"][key] = value
        with pytest.raises(ConfigError) as info:
            snapshot_from_wire(bad)
        assert info.value.key == f"apps.a.cold.{key}"
