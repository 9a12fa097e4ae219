"""Tests for superagent.coordinator.commands: codec round trips and field validation."""

from __future__ import annotations

import dataclasses
import json

import pytest

from superagent.coordinator import commands as cmd
from superagent.coordinator.errors import CommandError, UnknownCommand
from tests.coordinator.helpers import add_release, all_commands, base, register


def test_every_command_type_has_an_example() -> None:
    """The helper list covers every registered command type."""
    assert {c.type for c in all_commands()} == set(cmd.COMMANDS)


@pytest.mark.parametrize("command", all_commands(), ids=lambda c: c.type)
def test_json_round_trip(command: cmd.Command) -> None:
    """decode(to_json()) gives an equal command and the same canonical text."""
    text = command.to_json()
    assert json.loads(text)["type"] == command.type
    again = cmd.decode(text)
    assert again == command
    assert again.to_json() == text


def test_unknown_type_is_named() -> None:
    """An unknown type tag raises UnknownCommand naming it."""
    with pytest.raises(UnknownCommand, match="'reboot_world'"):
        cmd.decode(json.dumps({"type": "reboot_world", **base()}))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"capacity": "8"}, "capacity"),
        ({"capacity": True}, "capacity"),
        ({"capacity": 0}, "capacity"),
        ({"groups": "default"}, "groups"),
        ({"groups": []}, "groups"),
        ({"groups": ["Bad Group"]}, "groups"),
        ({"node": "-x"}, "node"),
        ({"key": ""}, "key"),
        ({"key": "k" * 201}, "key"),
        ({"actor": ""}, "actor"),
        ({"at": "now"}, "at"),
        ({"at": -1}, "at"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_field_is_named(change: dict[str, object], field: str) -> None:
    """A bad or unknown field raises CommandError naming the command type and field."""
    doc = {**json.loads(register().to_json()), **change}
    with pytest.raises(CommandError) as info:
        cmd.decode(json.dumps(doc))
    assert info.value.field == field
    assert info.value.command_type == "register_node"
    assert f"register_node.{field}" in str(info.value)


def test_missing_field_is_named() -> None:
    """A missing required field is named; a field with a default may be omitted."""
    doc = json.loads(register().to_json())
    del doc["address"]
    with pytest.raises(CommandError, match=r"register_node\.address: missing"):
        cmd.decode(json.dumps(doc))
    release = add_release()
    doc = json.loads(release.to_json())
    del doc["env"]
    assert cmd.decode(json.dumps(doc)) == dataclasses.replace(release, env={})


@pytest.mark.parametrize("text", ["", "[1]", "{", '{"type": 3}', "NaN"])
def test_not_a_command(text: str) -> None:
    """Non-JSON, non-objects and a missing type tag raise CommandError."""
    with pytest.raises(CommandError):
        cmd.decode(text)


def test_non_finite_at_is_refused() -> None:
    """`at` must be a finite number (JSON 1e999 parses as infinity)."""
    text = register().to_json().replace('"at":1000.0', '"at":1e999')
    with pytest.raises(CommandError, match="at"):
        cmd.decode(text)


def test_field_rules_apply_to_direct_construction() -> None:
    """Commands validate in __post_init__, so an invalid one cannot exist."""
    with pytest.raises(CommandError, match="lifecycle"):
        cmd.SetNodeLifecycle(**base(), node="n1", lifecycle="sleeping")
    with pytest.raises(CommandError, match="sha256"):
        cmd.AddRelease(**base(), app="a", sha256="xyz", size=1, spec={})
    with pytest.raises(CommandError, match="placement"):
        cmd.SetPlacement(**base(), app="a", placement={"n1": 10_000})
    with pytest.raises(CommandError, match="reason"):
        cmd.SetPlacement(**base(), app="a", placement={}, reason="x" * 2001)


@pytest.mark.parametrize(
    ("cls", "fields", "field"),
    [
        (cmd.LabelNode, {"node": "n1", "groups": ()}, "groups"),
        (cmd.LabelNode, {"node": "n1", "groups": ("web", "web")}, "groups"),
        (cmd.LabelNode, {"node": "n1", "groups": ("g" * 41,)}, "groups"),
        (cmd.LabelNode, {"node": "n 1", "groups": ("web",)}, "node"),
        (cmd.SetScale, {"app": "a", "groups": ()}, "groups"),
        (cmd.SetScale, {"app": "a", "groups": ("Web",)}, "groups"),
        (cmd.SetScale, {"app": "a", "groups": ("web",), "per_node": 65}, "per_node"),
        (cmd.SetScale, {"app": "a", "groups": ("web",), "per_node": -1}, "per_node"),
        (cmd.SetScale, {"app": "a", "groups": ("web",), "instances": 0}, "instances"),
        (cmd.SetScale, {"app": "a", "groups": ("web",), "instances": 10_001}, "instances"),
        (cmd.SetScale, {"app": "a", "groups": ("web",), "scale_id": "a b"}, "scale_id"),
        (cmd.FinishScale, {"app": "a", "scale_id": "s1", "outcome": "done"}, "outcome"),
        (cmd.FinishScale, {"app": "a", "scale_id": "", "outcome": "short"}, "scale_id"),
        (cmd.FinishScale, {"app": "a", "scale_id": "s1", "outcome": "short",
                           "reason": "x" * 2001}, "reason"),
    ],
)
def test_scale_command_fields(cls: type[cmd.Command], fields: dict[str, object],
                              field: str) -> None:
    """LabelNode, SetScale and FinishScale name the field they refuse."""
    with pytest.raises(CommandError) as info:
        cls(**base(), **fields)
    assert (info.value.field, info.value.command_type) == (field, cls.type)


def test_older_set_placement_without_reason_decodes() -> None:
    """A SetPlacement logged before it had a reason still decodes, with no reason."""
    doc = json.loads(cmd.SetPlacement(**base(), app="a", placement={"n1": 1}).to_json())
    del doc["reason"]
    assert cmd.decode(json.dumps(doc)).reason == ""  # type: ignore[attr-defined]


def test_set_scale_stores_one_kind_of_scale() -> None:
    """With ``instances`` set, ``per_node`` does not apply and is stored as its default."""
    command = cmd.SetScale(**base(), app="a", groups=("web",), per_node=4, instances=6)
    assert command.scale() == {"groups": ["web"], "per_node": 1, "instances": 6}
    command = cmd.SetScale(**base(), app="a", groups=("web",), per_node=4)
    assert command.scale() == {"groups": ["web"], "per_node": 4, "instances": None}


def test_commands_are_frozen_and_keyword_only() -> None:
    """Commands cannot be mutated or built positionally."""
    command = register()
    with pytest.raises(AttributeError):
        command.node = "n2"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cmd.NodeUp("k", 1.0, "me", "n1")  # type: ignore[call-arg]
