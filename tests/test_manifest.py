"""Tests for superagent/manifest.py: superagent.toml, Procfile and the JSON codec."""

from __future__ import annotations

import copy
import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from superagent.errors import ConfigError
from superagent.manifest import (
    MANIFEST,
    PROCFILE,
    AppSpec,
    BuildSpec,
    HealthSpec,
    LimitsSpec,
    RoutesSpec,
    RunSpec,
    ScaleSpec,
    TestSpec,
    load_manifest,
    parse_manifest,
    parse_procfile,
    spec_from_json,
    spec_to_json,
)

SOURCE = "superagent.toml"
MIB = 1024**2

FULL_TOML = """
[app]
name = "hello-2"

[build]
command = "pip install -r requirements.txt"

[test]
command = "python -m pytest -q"

[run]
command = "python app.py --port $PORT"

[health]
path = "/healthz"
ready_path = "/ready"
interval = "10s"
timeout = "500ms"
failures = 5
ready_deadline = "2m"

[routes]
prefix = "/Hello//world/"
strip_prefix = true
hosts = ["Hello.Example.COM.", "*.apps.example.com"]
port = 9001

[scale]
groups = ["default", "edge-1"]
per_node = 3
idle_timeout = "15m"

[limits]
memory = "256M"
cpu = 0.5
pids = 128
nofile = 1024
timeout = "45s"
max_body = "1M"

[env]
ZETA = "last"
GREETING = "hi"
_private = ""
"""

FULL_SPEC = AppSpec(
    name="hello-2",
    build=BuildSpec(command="pip install -r requirements.txt"),
    test=TestSpec(command="python -m pytest -q"),
    run=RunSpec(command="python app.py --port $PORT"),
    health=HealthSpec(path="/healthz", ready_path="/ready", interval=10.0, timeout=0.5,
                      failures=5, ready_deadline=120.0),
    routes=RoutesSpec(prefix="/Hello/world", strip_prefix=True,
                      hosts=("hello.example.com", "*.apps.example.com"), port=9001),
    scale=ScaleSpec(groups=("default", "edge-1"), per_node=3, idle_timeout=900.0),
    limits=LimitsSpec(memory=256 * MIB, cpu=0.5, pids=128, nofile=1024, timeout=45.0,
                      max_body=1 * MIB),
    env=(("GREETING", "hi"), ("ZETA", "last"), ("_private", "")),
)

# The example from docs/ARCHITECTURE.md, "Apps, releases, instances", verbatim.
ARCHITECTURE_EXAMPLE = """
[app]
name = "hello"
[build]                       # default: detected (requirements.txt -> venv + pip; package.json -> npm ci)
command = "pip install -r requirements.txt"
[test]                        # CI gate, run once per release before any traffic moves
command = "python -m pytest -q"
[run]
command = "python app.py"     # gets PORT, SUPERAGENT_APP, SUPERAGENT_RELEASE, SUPERAGENT_INSTANCE
[health]                      # liveness (restart when failing) and readiness (traffic only when ready)
path = "/healthz"
ready_path = "/healthz"
[routes]
prefix = "/hello"             # path-prefix rule on the shared port; strip_prefix optional
strip_prefix = true
hosts = ["hello.example.com"] # host rules (the vaas "domain config")
port = 9001                   # dedicated port rule
[scale]
groups = ["default"]          # logical machine groups
per_node = 1                  # instances per machine in those groups
idle_timeout = "0"            # >0: scale to zero when idle; the proxy holds requests on cold start
[limits]
memory = "256M"
cpu = 0.5
pids = 128
timeout = "30s"               # proxy request timeout for this app; one place for all timeouts
max_body = "10M"
[env]
GREETING = "hi"
"""  # noqa: E501


def minimal(**sections: dict[str, Any]) -> dict[str, Any]:
    """The smallest valid document, with ``sections`` merged into its tables."""
    doc: dict[str, Any] = {"app": {"name": "hello"}, "run": {"command": "python app.py"}}
    for name, values in sections.items():
        doc[name] = {**doc.get(name, {}), **values}
    return doc


def parse(doc: dict[str, Any]) -> AppSpec:
    return parse_manifest(doc, source=SOURCE)


def expect_error(doc: dict[str, Any], key: str, fragment: str = "") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(doc)
    error = info.value
    assert error.source == SOURCE
    assert error.key == key
    assert str(error).startswith(f"{SOURCE}: {key}: ")
    assert fragment in str(error)
    return error


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


# --- parsing: values and defaults ------------------------------------------------------------


def test_full_manifest_parses_every_field() -> None:
    """Every section and key of a fully populated manifest lands in the spec."""
    assert parse(tomllib.loads(FULL_TOML)) == FULL_SPEC


def test_architecture_example_parses() -> None:
    """The manifest example in the architecture document is valid as written."""
    spec = parse(tomllib.loads(ARCHITECTURE_EXAMPLE))
    assert spec.name == "hello"
    assert spec.routes == RoutesSpec(prefix="/hello", strip_prefix=True,
                                     hosts=("hello.example.com",), port=9001)
    assert spec.limits.memory == 256 * MIB
    assert spec.limits.max_body == 10 * MIB
    assert spec.scale.idle_timeout == 0.0
    assert spec.env_dict() == {"GREETING": "hi"}


def test_minimal_manifest_gets_defaults() -> None:
    """Only [app] name and [run] command are required; the rest has documented defaults."""
    spec = parse(minimal())
    assert spec == AppSpec(
        name="hello", build=BuildSpec(), test=TestSpec(), run=RunSpec(command="python app.py"),
        health=HealthSpec(), routes=RoutesSpec(), scale=ScaleSpec(), limits=LimitsSpec(),
    )
    assert spec.build.command is None
    assert spec.test.command is None
    assert spec.health == HealthSpec(path=None, ready_path=None, interval=5.0, timeout=2.0,
                                     failures=3, ready_deadline=60.0)
    assert spec.routes == RoutesSpec(prefix=None, strip_prefix=False, hosts=(), port=None)
    assert spec.scale == ScaleSpec(groups=("default",), per_node=1, idle_timeout=0.0)
    assert spec.limits == LimitsSpec(memory=None, cpu=None, pids=None, nofile=4096,
                                     timeout=30.0, max_body=10 * MIB)
    assert spec.env == ()
    assert spec.env_dict() == {}


def test_empty_sections_are_defaults() -> None:
    """Empty tables mean the same as absent ones."""
    doc = minimal(build={}, test={}, health={}, routes={}, scale={}, limits={}, env={})
    assert parse(doc) == parse(minimal())


def test_ready_path_defaults_to_path() -> None:
    """With only [health] path set, readiness checks the same path."""
    spec = parse(minimal(health={"path": "/healthz"}))
    assert spec.health.path == "/healthz"
    assert spec.health.ready_path == "/healthz"


def test_ready_path_alone_leaves_liveness_off() -> None:
    """With only ready_path set there is a readiness check and no liveness check."""
    spec = parse(minimal(health={"ready_path": "/ready"}))
    assert spec.health.path is None
    assert spec.health.ready_path == "/ready"


def test_health_spec_built_directly_defaults_ready_path() -> None:
    """HealthSpec(path=...) built in code applies the same ready_path default as the parser."""
    assert HealthSpec(path="/h").ready_path == "/h"
    assert HealthSpec(path="/h", ready_path="/r").ready_path == "/r"
    assert HealthSpec().ready_path is None


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("/hello", "/hello"),
        ("/hello/", "/hello"),
        ("/a//b/./c/", "/a/b/c"),
        ("/a/b/../c", "/a/c"),
        ("/%7Euser", "/~user"),
        ("/", "/"),
        ("//", "/"),
    ],
)
def test_prefix_is_normalised_like_the_proxy(raw: str, normalised: str) -> None:
    """routes.prefix goes through the proxy's path normalisation and loses trailing slashes."""
    assert parse(minimal(routes={"prefix": raw})).routes.prefix == normalised


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Hello.Example.COM", "hello.example.com"),
        ("hello.example.com.", "hello.example.com"),
        (" spaced.example.com ", "spaced.example.com"),
        ("*.Apps.Example.com", "*.apps.example.com"),
        ("localhost", "localhost"),
        ("[::1]", "[::1]"),
    ],
)
def test_hosts_are_normalised(raw: str, normalised: str) -> None:
    """Host rules are lower-cased without a trailing dot; a leading '*.' is kept."""
    assert parse(minimal(routes={"hosts": [raw]})).routes.hosts == (normalised,)


def test_single_host_and_group_strings_are_lists() -> None:
    """A single string where a list is expected is a one-element list."""
    spec = parse(minimal(routes={"hosts": "a.example.com"}, scale={"groups": "edge"}))
    assert spec.routes.hosts == ("a.example.com",)
    assert spec.scale.groups == ("edge",)


def test_numbers_for_durations_sizes_and_cpu() -> None:
    """Durations and sizes accept plain numbers; an integer cpu becomes a float."""
    spec = parse(minimal(
        health={"interval": 1, "timeout": 0.25, "ready_deadline": 30},
        scale={"idle_timeout": 600},
        limits={"memory": 4 * MIB, "cpu": 2, "timeout": 0, "max_body": 0},
    ))
    assert spec.health.interval == 1.0
    assert spec.health.timeout == 0.25
    assert spec.scale.idle_timeout == 600.0
    assert spec.limits.memory == 4 * MIB
    assert spec.limits.cpu == 2.0
    assert isinstance(spec.limits.cpu, float)
    assert spec.limits.timeout == 0.0
    assert spec.limits.max_body == 0


def test_limit_boundaries_accepted() -> None:
    """The edges of each range are valid values."""
    spec = parse(minimal(
        routes={"port": 65535},
        scale={"per_node": 0},
        limits={"memory": "4M", "cpu": 64, "pids": 1, "nofile": 64},
    ))
    assert spec.routes.port == 65535
    assert spec.scale.per_node == 0
    assert (spec.limits.memory, spec.limits.cpu, spec.limits.pids) == (4 * MIB, 64.0, 1)
    assert parse(minimal(routes={"port": 1}, scale={"per_node": 64},
                         limits={"cpu": 0.01, "nofile": 1024**2})).scale.per_node == 64


def test_env_is_sorted_and_env_dict() -> None:
    """[env] becomes key-sorted pairs; env_dict gives a plain dict."""
    spec = parse(minimal(env={"b": "2", "A": "1", "_c": "3"}))
    assert spec.env == (("A", "1"), ("_c", "3"), ("b", "2"))
    assert spec.env_dict() == {"A": "1", "b": "2", "_c": "3"}


def test_app_spec_built_directly_sorts_env() -> None:
    """AppSpec built in code keeps the sorted-env invariant."""
    spec = dataclasses.replace(FULL_SPEC, env=(("Z", "1"), ("A", "2")))
    assert spec.env == (("A", "2"), ("Z", "1"))


def test_specs_are_frozen_and_keyword_only() -> None:
    """The spec dataclasses are immutable and take keyword arguments only."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        FULL_SPEC.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        RunSpec("python app.py")  # type: ignore[call-arg]
    assert not hasattr(FULL_SPEC, "__dict__")


def test_test_spec_is_not_collected_by_pytest() -> None:
    """TestSpec opts out of pytest collection despite its name."""
    assert TestSpec.__test__ is False


# --- parsing: errors -------------------------------------------------------------------------


def test_unknown_top_level_section() -> None:
    """An unknown section is refused by name."""
    expect_error({**minimal(), "deploy": {}}, "deploy", "unknown key")


@pytest.mark.parametrize(
    "section", ["app", "build", "test", "run", "health", "routes", "scale", "limits"],
)
def test_unknown_key_in_every_section(section: str) -> None:
    """A misspelt key in any section is refused with its dotted name."""
    expect_error(minimal(**{section: {"bogus": 1}}), f"{section}.bogus", "unknown key")


@pytest.mark.parametrize("section", ["app", "build", "test", "run", "health", "routes",
                                     "scale", "limits", "env"])
def test_section_must_be_a_table(section: str) -> None:
    """A section given as a plain value is refused."""
    doc = minimal()
    doc[section] = "oops"
    expect_error(doc, section, "expected a table")


def test_app_section_required() -> None:
    """Without [app] there is no name."""
    doc = minimal()
    del doc["app"]
    expect_error(doc, "app", "is required")


def test_app_name_required() -> None:
    """[app] without name is refused."""
    expect_error({"app": {}, "run": {"command": "x"}}, "app.name", "is required")


@pytest.mark.parametrize(
    "name", ["Hello", "-hello", "he_llo", "he.llo", "", "a" * 41, "hé", "hello world", "x\n"],
)
def test_bad_app_names(name: str) -> None:
    """App names are strict because they become Unix user and cgroup names."""
    error = expect_error(minimal(app={"name": name}), "app.name", "Unix user name")
    assert "cgroup" in str(error)


def test_longest_app_name_accepted() -> None:
    """A 40-character name is the longest allowed."""
    assert parse(minimal(app={"name": "a" * 40})).name == "a" * 40


def test_app_name_must_be_a_string() -> None:
    """A non-string name is a type error on app.name."""
    expect_error(minimal(app={"name": 7}), "app.name", "expected a string")


def test_run_section_required() -> None:
    """Without [run] there is nothing to start."""
    expect_error({"app": {"name": "hello"}}, "run", "is required")


def test_run_command_required() -> None:
    """[run] without command is refused."""
    expect_error(minimal(run={"command": "x"}) | {"run": {}}, "run.command", "is required")


@pytest.mark.parametrize("section", ["run", "build", "test"])
@pytest.mark.parametrize(
    ("value", "fragment"),
    [("", "must not be empty"), ("   ", "must not be empty"), ("a\0b", "NUL"),
     (3, "expected a string"), (["python", "app.py"], "expected a string")],
)
def test_bad_commands(section: str, value: object, fragment: str) -> None:
    """Commands are non-empty strings in [run], [build] and [test]."""
    expect_error(minimal(**{section: {"command": value}}), f"{section}.command", fragment)


@pytest.mark.parametrize(
    ("values", "key", "fragment"),
    [
        ({"path": "healthz"}, "health.path", "starting with '/'"),
        ({"path": ""}, "health.path", "starting with '/'"),
        ({"path": 200}, "health.path", "expected a string"),
        ({"ready_path": "ready"}, "health.ready_path", "starting with '/'"),
        ({"interval": 0}, "health.interval", "greater than zero"),
        ({"interval": "soon"}, "health.interval", "expected a duration"),
        ({"timeout": "0s"}, "health.timeout", "greater than zero"),
        ({"timeout": -1}, "health.timeout", "duration"),
        ({"failures": 0}, "health.failures", "at least 1"),
        ({"failures": "3"}, "health.failures", "expected an integer"),
        ({"failures": True}, "health.failures", "expected an integer"),
        ({"ready_deadline": "0ms"}, "health.ready_deadline", "greater than zero"),
    ],
)
def test_bad_health(values: dict[str, Any], key: str, fragment: str) -> None:
    """Health paths start with '/', timings are positive, failures at least one."""
    expect_error(minimal(health=values), key, fragment)


@pytest.mark.parametrize(
    ("values", "key", "fragment"),
    [
        ({"prefix": "hello"}, "routes.prefix", "must start with '/'"),
        ({"prefix": ""}, "routes.prefix", "must start with '/'"),
        ({"prefix": "/a b"}, "routes.prefix", "invalid character"),
        ({"prefix": "/a?b=1"}, "routes.prefix", "invalid character"),
        ({"prefix": "/a%2Fb"}, "routes.prefix", "plain path"),
        ({"prefix": "/a%zz"}, "routes.prefix", "percent-escape"),
        ({"prefix": 5}, "routes.prefix", "expected a string"),
        ({"strip_prefix": True}, "routes.strip_prefix", "needs a prefix"),
        ({"prefix": "/a", "strip_prefix": "yes"}, "routes.strip_prefix", "true or false"),
        ({"hosts": ["exa mple.com"]}, "routes.hosts", "not a host name"),
        ({"hosts": [""]}, "routes.hosts", "not a host name"),
        ({"hosts": ["*."]}, "routes.hosts", "not a host name"),
        ({"hosts": ["a/b.com"]}, "routes.hosts", "not a host name"),
        ({"hosts": ["example.com:8080"]}, "routes.hosts", "no port"),
        ({"hosts": ["a.example.com", "A.example.com."]}, "routes.hosts", "listed twice"),
        ({"hosts": 5}, "routes.hosts", "list of strings"),
        ({"hosts": ["a.com", 5]}, "routes.hosts", "list of strings"),
        ({"port": 0}, "routes.port", "at least 1"),
        ({"port": 65536}, "routes.port", "at most 65535"),
        ({"port": "80"}, "routes.port", "expected an integer"),
        ({"port": True}, "routes.port", "expected an integer"),
    ],
)
def test_bad_routes(values: dict[str, Any], key: str, fragment: str) -> None:
    """Route rules are validated and normalised like the proxy's own config."""
    expect_error(minimal(routes=values), key, fragment)


@pytest.mark.parametrize(
    ("values", "key", "fragment"),
    [
        ({"groups": []}, "scale.groups", "at least one"),
        ({"groups": ["Default"]}, "scale.groups", "not a valid group name"),
        ({"groups": ["-edge"]}, "scale.groups", "not a valid group name"),
        ({"groups": [""]}, "scale.groups", "not a valid group name"),
        ({"groups": ["a_b"]}, "scale.groups", "not a valid group name"),
        ({"groups": ["edge\n"]}, "scale.groups", "not a valid group name"),
        ({"groups": ["a", "a"]}, "scale.groups", "listed twice"),
        ({"groups": [1]}, "scale.groups", "list of strings"),
        ({"per_node": -1}, "scale.per_node", "at least 0"),
        ({"per_node": 65}, "scale.per_node", "at most 64"),
        ({"per_node": 1.5}, "scale.per_node", "expected an integer"),
        ({"groups": ["g" * 41]}, "scale.groups", "1-40 lower-case"),
        ({"instances": 0}, "scale.instances", "at least 1"),
        ({"instances": 10_001}, "scale.instances", "at most 10000"),
        ({"instances": "3"}, "scale.instances", "expected an integer"),
        ({"instances": 3, "per_node": 1}, "scale.instances", "not both"),
        ({"min": 1, "max": 3}, "scale.target", "required with min, max"),
        ({"target": 5}, "scale.min", "required with target"),
        ({"min": 4, "max": 3, "target": 5}, "scale.min", "not be above max"),
        ({"min": 1, "max": 3, "target": 0}, "scale.target", "positive number"),
        ({"min": 1, "max": 3, "target": "5"}, "scale.target", "positive number"),
        ({"min": 1, "max": 3, "target": 5, "metric": "rps"}, "scale.metric", "in_flight, cpu"),
        ({"min": 1, "max": 3, "target": 5, "instances": 2}, "scale.instances", "autoscaled"),
        ({"min": 1, "max": 3, "target": 5, "per_node": 2}, "scale.per_node", "autoscaled"),
        ({"min": 0, "max": 2, "target": 5}, "scale.min", "at least 1"),
        ({"idle_timeout": "-1s"}, "scale.idle_timeout", "expected a duration"),
        ({"idle_timeout": "1d"}, "scale.idle_timeout", "expected a duration"),
    ],
)
def test_bad_scale(values: dict[str, Any], key: str, fragment: str) -> None:
    """Groups are named and non-empty; per_node stays within 0..64; instances is 1..10000
    and excludes an explicit per_node."""
    expect_error(minimal(scale=values), key, fragment)


def test_instances_in_total() -> None:
    """``instances`` is K in total; per_node then does not apply and keeps its default."""
    spec = parse(minimal(scale={"groups": ["web"], "instances": 5}))
    assert spec.scale == ScaleSpec(groups=("web",), per_node=1, instances=5)
    doc = spec_to_json(spec)
    assert doc["scale"] == {"groups": ["web"], "instances": 5, "idle_timeout": 0.0}
    assert spec_from_json(doc) == spec
    assert ScaleSpec(per_node=3, instances=2).per_node == 1  # built directly: the same


def test_autoscaling_keys() -> None:
    """min/max/target (and metric) make an autoscaled app; the JSON keeps exactly them."""
    spec = parse(minimal(scale={"groups": ["web"], "min": 1, "max": 8, "target": 10,
                                "metric": "cpu"}))
    assert spec.scale.auto == {"min": 1, "max": 8, "target": 10.0, "metric": "cpu"}
    doc = spec_to_json(spec)
    assert doc["scale"] == {"groups": ["web"], "idle_timeout": 0.0, "min": 1, "max": 8,
                            "target": 10.0, "metric": "cpu"}
    assert spec_from_json(doc) == spec
    assert parse(minimal(scale={"min": 1, "max": 2, "target": 3})).scale.metric == "in_flight"
    assert parse(minimal()).scale.auto is None


def test_group_names_follow_the_shared_rule() -> None:
    """A manifest accepts exactly the group names a node can register with."""
    from superagent.coordinator.commands import RegisterNode
    from superagent.names import GROUP_NAME_MAX

    longest = "g" * GROUP_NAME_MAX
    assert parse(minimal(scale={"groups": [longest]})).scale.groups == (longest,)
    RegisterNode(key="k", at=1.0, actor="a", node="n1", address="h:1", groups=(longest,),
                 capacity=1)


def test_older_spec_json_without_instances_loads() -> None:
    """A spec document written before ``instances`` existed loads unchanged and writes
    back the same document (the Raft log and snapshots keep their bytes)."""
    old = {"app": {"name": "hello"}, "build": {}, "test": {}, "run": {"command": "x"},
           "health": {"interval": 5.0, "timeout": 2.0, "failures": 3,
                      "ready_deadline": 60.0},
           "routes": {"strip_prefix": False, "hosts": []},
           "scale": {"groups": ["default"], "per_node": 2, "idle_timeout": 0.0},
           "limits": {"nofile": 4096, "timeout": 30.0, "max_body": 10 * 1024**2}, "env": {}}
    spec = spec_from_json(old)
    assert (spec.scale.per_node, spec.scale.instances) == (2, None)
    assert spec_to_json(spec)["scale"] == old["scale"]


@pytest.mark.parametrize(
    ("values", "key", "fragment"),
    [
        ({"memory": "3M"}, "limits.memory", "at least 4M"),
        ({"memory": 0}, "limits.memory", "at least 4M"),
        ({"memory": "lots"}, "limits.memory", "expected a size like '10M'"),
        ({"memory": "-1M"}, "limits.memory", "expected a size like '10M'"),
        ({"memory": 1.5}, "limits.memory", "expected a size like '10M'"),
        ({"cpu": 0}, "limits.cpu", "more than 0"),
        ({"cpu": -0.5}, "limits.cpu", "more than 0"),
        ({"cpu": 64.5}, "limits.cpu", "at most 64"),
        ({"cpu": "0.5"}, "limits.cpu", "number of cores"),
        ({"cpu": True}, "limits.cpu", "number of cores"),
        ({"cpu": float("nan")}, "limits.cpu", "more than 0"),
        ({"cpu": float("inf")}, "limits.cpu", "at most 64"),
        ({"pids": 0}, "limits.pids", "at least 1"),
        ({"pids": "128"}, "limits.pids", "expected an integer"),
        ({"nofile": 10}, "limits.nofile", "at least 64"),
        ({"nofile": 2**21}, "limits.nofile", "at most"),
        ({"timeout": "forever"}, "limits.timeout", "expected a duration"),
        ({"max_body": "10X"}, "limits.max_body", "expected a size"),
    ],
)
def test_bad_limits(values: dict[str, Any], key: str, fragment: str) -> None:
    """Resource limits are range-checked; sizes and durations parse like the rest."""
    expect_error(minimal(limits=values), key, fragment)


@pytest.mark.parametrize(
    ("env", "key", "fragment"),
    [
        ({"1X": "a"}, "env.1X", "letters, digits and '_'"),
        ({"A-B": "a"}, "env.A-B", "letters, digits and '_'"),
        ({"": "a"}, "env.", "letters, digits and '_'"),
        ({"A\n": "a"}, "env.A\n", "letters, digits and '_'"),
        ({"PORT": "80"}, "env.PORT", "reserved"),
        ({"SUPERAGENT_APP": "x"}, "env.SUPERAGENT_APP", "reserved"),
        ({"SUPERAGENT_": "x"}, "env.SUPERAGENT_", "reserved"),
        ({"N": 1}, "env.N", "expected a string"),
        ({"B": True}, "env.B", "expected a string"),
        ({"T": {"x": "y"}}, "env.T", "expected a string"),
        ({"L": ["a"]}, "env.L", "expected a string"),
        ({"Z": "a\0b"}, "env.Z", "NUL"),
    ],
)
def test_bad_env(env: dict[str, Any], key: str, fragment: str) -> None:
    """Env keys are shell names, values strings, PORT and SUPERAGENT_* reserved."""
    expect_error(minimal(env=env), key, fragment)


def test_reserved_env_names_are_case_sensitive() -> None:
    """Only the exact reserved names are refused, as environment names are case-sensitive."""
    assert parse(minimal(env={"port": "1", "Superagent_x": "2"})).env_dict() == {
        "port": "1", "Superagent_x": "2"}


def test_first_error_wins_in_document_order() -> None:
    """Errors in several sections report the earliest section checked ([app] first)."""
    expect_error(minimal(app={"name": "BAD"}, limits={"cpu": 0}), "app.name")


# --- files -----------------------------------------------------------------------------------


def test_load_superagent_toml(tmp_path: Path) -> None:
    """load_manifest reads superagent.toml from the directory."""
    write(tmp_path, MANIFEST, FULL_TOML)
    assert load_manifest(tmp_path) == FULL_SPEC
    assert load_manifest(tmp_path, app="hello-2") == FULL_SPEC


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    """A validation error from load_manifest names the manifest's path and the key."""
    path = write(tmp_path, MANIFEST, '[app]\nname = "x"\n[run]\ncommand = "a"\n[limits]\ncpu = 0\n')
    with pytest.raises(ConfigError) as info:
        load_manifest(tmp_path)
    assert info.value.source == str(path)
    assert str(info.value).startswith(f"{path}: limits.cpu: ")


def test_load_app_name_mismatch(tmp_path: Path) -> None:
    """Deploying a manifest under another name is refused on app.name."""
    path = write(tmp_path, MANIFEST, '[app]\nname = "hello"\n[run]\ncommand = "a"\n')
    with pytest.raises(ConfigError) as info:
        load_manifest(tmp_path, app="other")
    assert (info.value.source, info.value.key) == (str(path), "app.name")
    assert "'hello'" in str(info.value)
    assert "'other'" in str(info.value)


def test_load_toml_without_name_uses_app(tmp_path: Path) -> None:
    """A superagent.toml that leaves out [app] name takes the name the caller gives."""
    write(tmp_path, MANIFEST, '[app]\n[run]\ncommand = "a"\n')
    assert load_manifest(tmp_path, app="hello").name == "hello"
    write(tmp_path, MANIFEST, '[run]\ncommand = "a"\n')
    assert load_manifest(tmp_path, app="hello").name == "hello"


def test_load_toml_without_name_or_app(tmp_path: Path) -> None:
    """Without a name in the file or from the caller, the manifest is refused."""
    path = write(tmp_path, MANIFEST, '[app]\n[run]\ncommand = "a"\n')
    with pytest.raises(ConfigError) as info:
        load_manifest(tmp_path)
    assert (info.value.source, info.value.key) == (str(path), "app.name")


def test_load_toml_given_app_name_is_validated(tmp_path: Path) -> None:
    """A name supplied by the caller obeys the same rules as one in the file."""
    write(tmp_path, MANIFEST, '[run]\ncommand = "a"\n')
    with pytest.raises(ConfigError, match="Unix user name"):
        load_manifest(tmp_path, app="Bad_Name")


def test_load_invalid_toml(tmp_path: Path) -> None:
    """Malformed TOML is a ConfigError naming the file."""
    path = write(tmp_path, MANIFEST, "[app\nname = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_manifest(tmp_path)
    assert info.value.source == str(path)


def test_load_procfile_only(tmp_path: Path) -> None:
    """A Procfile's web: line is a minimal manifest; the name comes from the caller."""
    write(tmp_path, PROCFILE, "web: gunicorn app:app --bind 127.0.0.1:$PORT\n")
    spec = load_manifest(tmp_path, app="hello")
    assert spec == dataclasses.replace(
        parse(minimal()), run=RunSpec(command="gunicorn app:app --bind 127.0.0.1:$PORT"))


def test_load_procfile_variants(tmp_path: Path) -> None:
    """Comments, blank lines, CRLF, spacing and other process types are all accepted."""
    write(tmp_path, PROCFILE, (
        "# processes\r\n\r\n  release: ./migrate\r\nworker:python worker.py\r\n"
        "   \r\n  web :   node server.js   \r\n# web: not this one\r\n"))
    assert load_manifest(tmp_path, app="hello").run.command == "node server.js"


def test_load_procfile_requires_app(tmp_path: Path) -> None:
    """A Procfile carries no name, so the caller must give one."""
    path = write(tmp_path, PROCFILE, "web: python app.py\n")
    with pytest.raises(ConfigError, match="does not name the app") as info:
        load_manifest(tmp_path)
    assert info.value.source == str(path)


def test_load_procfile_bad_app_name(tmp_path: Path) -> None:
    """The caller's name for a Procfile app is validated like [app] name."""
    path = write(tmp_path, PROCFILE, "web: python app.py\n")
    with pytest.raises(ConfigError, match="Unix user name") as info:
        load_manifest(tmp_path, app="-x")
    assert (info.value.source, info.value.key) == (str(path), "app.name")


def test_load_procfile_without_web(tmp_path: Path) -> None:
    """A Procfile without a web: line is refused, naming the file."""
    path = write(tmp_path, PROCFILE, "worker: python worker.py\n# web: commented out\n")
    with pytest.raises(ConfigError, match="no 'web:' line") as info:
        load_manifest(tmp_path, app="hello")
    assert info.value.source == str(path)
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("web: a\nthis is not a process\n", 2, "expected 'type: command'"),
        ("\n\nweb:\n", 3, "has no command"),
        ("web: a\nweb: b\n", 2, "listed twice"),
        ("we b: a\n", 1, "expected 'type: command'"),
        (": a\n", 1, "expected 'type: command'"),
    ],
)
def test_bad_procfile_lines(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    """Malformed Procfile lines are refused with the file and line number."""
    path = write(tmp_path, PROCFILE, text)
    with pytest.raises(ConfigError) as info:
        load_manifest(tmp_path, app="hello")
    assert (info.value.source, info.value.key) == (str(path), f"line {line}")
    assert fragment in str(info.value)


def test_load_procfile_not_utf8(tmp_path: Path) -> None:
    """A Procfile that is not UTF-8 is a ConfigError naming the file."""
    path = tmp_path / PROCFILE
    path.write_bytes(b"web: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        load_manifest(tmp_path, app="hello")
    assert info.value.source == str(path)


def test_parse_procfile_returns_every_type() -> None:
    """parse_procfile maps each process type to its command."""
    assert parse_procfile("web: a b\n# c\nworker: d\n", source=PROCFILE) == {
        "web": "a b", "worker": "d"}
    assert parse_procfile("", source=PROCFILE) == {}


def test_superagent_toml_wins_over_procfile(tmp_path: Path) -> None:
    """With both files present, superagent.toml is used and the Procfile ignored."""
    write(tmp_path, MANIFEST, '[app]\nname = "hello"\n[run]\ncommand = "from-toml"\n')
    write(tmp_path, PROCFILE, "this line would be an error\nweb: from-procfile\n")
    assert load_manifest(tmp_path).run.command == "from-toml"


def test_superagent_toml_without_run_does_not_fall_back(tmp_path: Path) -> None:
    """superagent.toml wins wholly: a missing [run] is an error even beside a Procfile."""
    path = write(tmp_path, MANIFEST, '[app]\nname = "hello"\n')
    write(tmp_path, PROCFILE, "web: from-procfile\n")
    with pytest.raises(ConfigError) as info:
        load_manifest(tmp_path)
    assert (info.value.source, info.value.key) == (str(path), "run")


def test_no_manifest(tmp_path: Path) -> None:
    """A directory without either file is refused, naming it and both file names."""
    with pytest.raises(ConfigError) as info:
        load_manifest(tmp_path, app="hello")
    message = str(info.value)
    assert info.value.source == str(tmp_path)
    assert str(tmp_path) in message
    assert MANIFEST in message
    assert PROCFILE in message


def test_missing_directory(tmp_path: Path) -> None:
    """A directory that does not exist gets the same no-manifest error."""
    with pytest.raises(ConfigError, match=MANIFEST):
        load_manifest(tmp_path / "absent")


# --- JSON codec ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [FULL_SPEC, parse(minimal())], ids=["full", "minimal"])
def test_json_round_trip(spec: AppSpec) -> None:
    """spec_from_json(spec_to_json(s)) == s, also through json.dumps/loads."""
    doc = spec_to_json(spec)
    assert spec_from_json(doc) == spec
    text = json.dumps(doc)
    assert "null" not in text
    assert spec_from_json(json.loads(text)) == spec


def test_permissions_parse_default_and_round_trip() -> None:
    """[permissions] takes network = any|loopback and filesystem = any|release; a spec
    without it writes no permissions table (the document older versions wrote)."""
    spec = parse(minimal(permissions={"network": "loopback", "filesystem": "release"}))
    assert (spec.permissions.network, spec.permissions.filesystem) == ("loopback", "release")
    assert spec_from_json(json.loads(json.dumps(spec_to_json(spec)))) == spec
    plain = parse(minimal())
    assert (plain.permissions.network, plain.permissions.filesystem) == ("any", "any")
    assert "permissions" not in spec_to_json(plain)
    expect_error(minimal(permissions={"network": "lan"}), "permissions.network", "loopback")
    expect_error(minimal(permissions={"filesystem": "none"}), "permissions.filesystem",
                 "release")
    expect_error(minimal(permissions={"disk": "any"}), "permissions.disk")


def test_json_round_trip_of_partial_health_and_routes() -> None:
    """Readiness without liveness, hosts without prefix, and a port alone survive the trip."""
    spec = parse(minimal(health={"ready_path": "/r"}, routes={"hosts": ["*.a.com"], "port": 81},
                         limits={"cpu": 1, "memory": "1G"}))
    assert spec_from_json(json.loads(json.dumps(spec_to_json(spec)))) == spec


def test_json_document_is_a_valid_manifest() -> None:
    """The JSON form has the manifest's shape, so parse_manifest accepts it as is."""
    assert parse(spec_to_json(FULL_SPEC)) == FULL_SPEC
    assert spec_to_json(FULL_SPEC)["limits"]["memory"] == 256 * MIB
    assert spec_to_json(FULL_SPEC)["env"] == {"GREETING": "hi", "ZETA": "last", "_private": ""}


def test_json_does_not_share_state_with_spec() -> None:
    """Mutating the JSON document does not affect a spec decoded from an earlier copy."""
    doc = spec_to_json(FULL_SPEC)
    saved = copy.deepcopy(doc)
    doc["routes"]["hosts"].append("x.com")
    doc["env"]["NEW"] = "1"
    assert spec_from_json(saved) == FULL_SPEC
    assert FULL_SPEC.routes.hosts == ("hello.example.com", "*.apps.example.com")


def test_spec_from_json_validates() -> None:
    """A tampered document is refused like a bad manifest, with source 'spec'."""
    doc = spec_to_json(FULL_SPEC)
    doc["env"]["PORT"] = "1"
    with pytest.raises(ConfigError) as info:
        spec_from_json(doc)
    assert (info.value.source, info.value.key) == ("spec", "env.PORT")
    doc = spec_to_json(FULL_SPEC)
    doc["limits"]["swap"] = "1G"
    with pytest.raises(ConfigError, match=r"spec: limits\.swap: unknown key"):
        spec_from_json(doc)


_ENV_KEYS = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,30}\Z").filter(
    lambda key: key != "PORT" and not key.startswith("SUPERAGENT_"))
_ENV_VALUES = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"),
                      max_size=50)


@settings(max_examples=100, deadline=None)
@given(env=st.dictionaries(_ENV_KEYS, _ENV_VALUES, max_size=12))
def test_random_env_round_trips(env: dict[str, str]) -> None:
    """Any valid env dict survives parse, spec_to_json, json.dumps/loads and spec_from_json."""
    spec = parse(minimal(env=env))
    assert spec.env_dict() == env
    assert [key for key, _ in spec.env] == sorted(env)
    wire = json.loads(json.dumps(spec_to_json(spec)))
    assert spec_from_json(wire) == spec


def test_build_python_pins_a_version() -> None:
    """[build] python is "3" or "3.N", kept through the JSON form; anything else is named."""
    spec = parse(minimal(build={"python": "3.12"}))
    assert spec.build.python == "3.12"
    assert spec_from_json(spec_to_json(spec)) == spec
    assert parse(minimal()).build.python is None
    for bad in ("python3.11", "2.7", "3.11.4", ""):
        expect_error(minimal(build={"python": bad}), "build.python", "Python version")


def test_rewrite_paths_needs_a_stripped_prefix() -> None:
    """[routes] rewrite_paths goes with strip_prefix, and survives the JSON form."""
    spec = parse(minimal(routes={"prefix": "/web", "strip_prefix": True,
                                 "rewrite_paths": True}))
    assert spec.routes.rewrite_paths is True
    assert spec_from_json(spec_to_json(spec)) == spec
    expect_error(minimal(routes={"prefix": "/web", "rewrite_paths": True}),
                 "routes.rewrite_paths", "strip_prefix")


def test_min_0_is_scale_to_zero_and_needs_idle_timeout() -> None:
    """``min = 0`` with ``idle_timeout``: the app may idle to zero; the JSON form keeps it."""
    spec = parse(minimal(scale={"min": 0, "max": 4, "target": 5, "idle_timeout": "5m"}))
    assert spec.scale.auto == {"min": 0, "max": 4, "target": 5.0, "metric": "in_flight"}
    assert spec.scale.idle_timeout == 300.0
    assert spec_from_json(spec_to_json(spec)) == spec


def test_upgrades_and_min_body_rate_reach_the_spec_and_its_json() -> None:
    """[routes] upgrades and [limits] min_body_rate are read, checked, and kept in the JSON
    form only when set (older documents stay byte for byte)."""
    spec = parse(minimal(routes={"prefix": "/web", "upgrades": ["websocket", "Foo"]},
                         limits={"min_body_rate": "512"}))
    assert spec.routes.upgrades == ("websocket", "foo")
    assert spec.limits.min_body_rate == 512
    assert spec_from_json(spec_to_json(spec)) == spec
    plain = parse(minimal())
    assert plain.routes.upgrades == ("websocket",) and plain.limits.min_body_rate == 1024
    doc = spec_to_json(plain)
    assert "upgrades" not in doc["routes"] and "min_body_rate" not in doc["limits"]
    expect_error(minimal(routes={"upgrades": ["h2c"]}), "routes.upgrades", "h2c")
