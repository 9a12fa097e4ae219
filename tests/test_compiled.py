"""The compiled hot path never shadows an edited source (superagent/compiled.py).

The mypyc build itself is exercised by scripts/test, which compiles the hot path and
runs the proxy's whole suite against it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from superagent import compiled


def source(root: Path, module: str) -> Path:
    """Where a hot module's source lives under ``root``."""
    return root / (module.replace(".", "/") + ".py")


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in tree: one source per hot module, in the proxy package and in the core."""
    for module in compiled.HOT_MODULES:
        source(tmp_path, module).parent.mkdir(parents=True, exist_ok=True)
        source(tmp_path, module).write_text(f"# {module}\n")
    monkeypatch.setattr(compiled, "ROOT", tmp_path)
    monkeypatch.setattr(compiled, "STAMP", tmp_path / "superagent" / ".compiled.json")
    monkeypatch.setattr(compiled, "BUILD_INFO", tmp_path / "superagent" / ".build.json")
    return tmp_path


def fake_build(root: Path) -> list[Path]:
    """What a build leaves: every extension, the group's runtime, and the stamp."""
    paths = [root / (m.replace(".", "/") + compiled.SUFFIX) for m in compiled.HOT_MODULES]
    paths.append(root / "superagent" / f"_hot__mypyc{compiled.SUFFIX}")
    for path in paths:
        path.write_bytes(b"\x7fELF")
    stamp = {m: hashlib.sha256(source(root, m).read_bytes()).hexdigest()
             for m in compiled.HOT_MODULES}
    (root / "superagent" / ".compiled.json").write_text(json.dumps(stamp))
    return paths


def test_the_group_spans_the_proxy_and_the_core_normaliser() -> None:
    """normalize_path runs per request, so the core module is compiled with the proxy's."""
    assert "superagent.httprules" in compiled.HOT_MODULES
    assert "superagent.proxy.http1" in compiled.HOT_MODULES
    assert not compiled.GROUP.startswith("superagent.proxy")  # the core must not load it


def test_up_to_date_extensions_are_kept(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A stamp that matches every source keeps the extensions, silently."""
    extensions = fake_build(root)
    assert compiled.drop_stale() is False
    assert all(path.exists() for path in extensions)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("edited", ["superagent.proxy.routes", "superagent.httprules"])
def test_an_edited_source_removes_every_extension(root: Path, edited: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Editing any hot module, the core one too, removes the whole group and its stamp."""
    extensions = fake_build(root)
    source(root, edited).write_text("# edited\n")
    assert compiled.drop_stale() is True
    assert not any(path.exists() for path in extensions)
    assert not (root / "superagent" / ".compiled.json").exists()
    assert "scripts/compile-proxy" in capsys.readouterr().err
    assert compiled.drop_stale() is False  # nothing left to remove


def test_extensions_without_a_stamp_are_removed(root: Path) -> None:
    """Extensions no stamp accounts for are removed."""
    extensions = fake_build(root)
    (root / "superagent" / ".compiled.json").unlink()
    assert compiled.drop_stale() is True
    assert not any(path.exists() for path in extensions)


def test_a_build_from_before_the_core_joined_the_group_is_removed(root: Path) -> None:
    """The runtime and stamp an older build left in the proxy package do not linger."""
    legacy_runtime = root / "superagent" / "proxy" / f"_hot__mypyc{compiled.SUFFIX}"
    legacy_stamp = root / "superagent" / "proxy" / ".compiled.json"
    old_extension = root / "superagent" / "proxy" / f"routes{compiled.SUFFIX}"
    for path in (legacy_runtime, legacy_stamp, old_extension):
        path.write_bytes(b"old")
    assert compiled.drop_stale() is True
    assert not any(p.exists() for p in (legacy_runtime, legacy_stamp, old_extension))


def test_no_extensions_is_pure_python(root: Path) -> None:
    """Nothing compiled: nothing to do; a bad command is a usage error."""
    assert compiled.drop_stale() is False
    assert compiled.main(["nonsense"]) == 2


def test_hot_path_says_which_and_why(root: Path) -> None:
    """``superagent version`` and ``status`` report this: compiled or pure, and why."""
    info = root / "superagent" / ".build.json"
    assert compiled.hot_path() == (False, "not compiled in this checkout; "
                                          "scripts/compile-proxy builds it")
    info.write_text(json.dumps({"compiled": False, "reason": "no C compiler"}))
    assert compiled.hot_path() == (False, "no C compiler")  # what the package build said
    assert compiled.describe() == "pure Python (no C compiler)"

    extensions = fake_build(root)
    assert compiled.hot_path() == (True, "mypyc, built by compile-proxy")
    info.write_text(json.dumps({"compiled": True, "reason": "compiled at install"}))
    assert compiled.describe() == "compiled (mypyc, built at install)"

    extensions[0].unlink()
    compiled_now, why = compiled.hot_path()
    assert not compiled_now and "incomplete" in why


def test_a_build_into_a_target_leaves_the_tree_alone(root: Path, tmp_path_factory:
                                                     pytest.TempPathFactory,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The package build compiles into its build tree: the checkout's own extensions and
    stamp stay as they were, and a failed compile raises for setup.py to fall back."""
    import subprocess

    extensions = fake_build(root)
    target = tmp_path_factory.mktemp("build")
    stale = [target / path.relative_to(root) for path in extensions]
    stale.append(target / "superagent" / ".compiled.json")
    for path in stale:  # an earlier build of this build dir: never shipped again
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"old")

    def failing(*args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(args, 1, "", "error: no compiler")

    monkeypatch.setattr(subprocess, "run", failing)
    with pytest.raises(RuntimeError, match="no compiler"):
        compiled.build(target)
    assert all(path.exists() for path in extensions)
    assert not any(path.exists() for path in stale)
    assert not (target / "superagent" / ".compiled.json").exists()


def test_the_version_command_reports_the_hot_path(capsys: pytest.CaptureFixture[str]) -> None:
    from superagent.cli import main

    assert main(["version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("superagent 0.1.0\nproxy hot path: ")
    assert compiled.describe() in out
    assert main(["--json", "version"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["proxy_hot_path"] in ("compiled", "pure") and doc["reason"]


def test_status_shows_each_nodes_hot_path() -> None:
    """`superagent status` lists what each agent's heartbeat says its proxy runs; agents
    from before the field are left out, not shown as unknown."""
    from superagent.client_cli import render_hot_paths

    nodes = {"nodes": [{"name": "a", "status": {"proxy_hot_path": "compiled (mypyc)"}},
                       {"name": "b", "status": {"proxy_hot_path": "pure Python (no gcc)"}},
                       {"name": "old", "status": {}}, {"name": "down", "status": None}]}
    assert render_hot_paths(nodes) == ("\nproxy hot path:\n  a: compiled (mypyc)\n"
                                       "  b: pure Python (no gcc)")
    assert render_hot_paths({"nodes": [{"name": "old", "status": {}}]}) == ""
