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
