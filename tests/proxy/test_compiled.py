"""The compiled hot path never shadows an edited source (superagent/proxy/compiled.py).

The mypyc build itself is exercised by scripts/test, which compiles the hot path and
runs the proxy's whole suite against it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from superagent.proxy import compiled


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in package directory: one source per hot module, and its extensions."""
    for module in compiled.HOT_MODULES:
        (tmp_path / f"{module}.py").write_text(f"# {module}\n")
    monkeypatch.setattr(compiled, "PACKAGE_DIR", tmp_path)
    monkeypatch.setattr(compiled, "STAMP", tmp_path / ".compiled.json")
    return tmp_path


def fake_build(package: Path) -> list[Path]:
    """What a build leaves: every extension, and the stamp of the sources it compiled."""
    names = [f"{m}{compiled.SUFFIX}" for m in compiled.HOT_MODULES]
    names.append(f"_hot__mypyc{compiled.SUFFIX}")
    for name in names:
        (package / name).write_bytes(b"\x7fELF")
    stamp = {m: hashlib.sha256((package / f"{m}.py").read_bytes()).hexdigest()
             for m in compiled.HOT_MODULES}
    (package / ".compiled.json").write_text(json.dumps(stamp))
    return [package / name for name in names]


def test_up_to_date_extensions_are_kept(package: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    extensions = fake_build(package)
    assert compiled.drop_stale() is False
    assert all(path.exists() for path in extensions)
    assert capsys.readouterr().err == ""


def test_an_edited_source_removes_every_extension(package: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    extensions = fake_build(package)
    (package / "routes.py").write_text("# routes, edited\n")
    assert compiled.drop_stale() is True
    assert not any(path.exists() for path in extensions)
    assert not (package / ".compiled.json").exists()
    assert "scripts/compile-proxy" in capsys.readouterr().err
    assert compiled.drop_stale() is False  # nothing left to remove


def test_extensions_without_a_stamp_are_removed(package: Path) -> None:
    extensions = fake_build(package)
    (package / ".compiled.json").unlink()
    assert compiled.drop_stale() is True
    assert not any(path.exists() for path in extensions)


def test_no_extensions_is_pure_python(package: Path) -> None:
    assert compiled.drop_stale() is False
    assert compiled.main(["nonsense"]) == 2
