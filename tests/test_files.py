"""Atomic writes and names kept inside their folder (tinylora/formats/files.py).

A write either completes or leaves the old file exactly as it was, with no
temporary file behind, even when interrupted (KeyboardInterrupt included).
"""

import os

import pytest

from tinylora.errors import TinyloraError
from tinylora.formats.files import atomic_folder, atomic_write, inside, read_json, write_json, write_text


def leftovers(folder):
    """Hidden temporary files or folders a write may have left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- atomic writes ----------------------------------------------------------------

def test_atomic_write_replaces_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "a.bin"
    with atomic_write(path) as f:
        f.write(b"first")
    with atomic_write(path) as f:
        f.write(b"second")
    assert path.read_bytes() == b"second"
    assert leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, "the file should get open()'s permissions, not 0600"


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_failure_keeps_old_file(tmp_path, error):
    path = tmp_path / "a.json"
    write_json(path, {"old": True})
    before = path.read_bytes()
    with pytest.raises(error):
        with atomic_write(path) as f:
            f.write(b'{"new": tr')
            raise error("killed mid-write")
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_write_json_and_text_format(tmp_path):
    write_json(tmp_path / "c.json", {"name": "小李", "n": [1, 2]})
    text = (tmp_path / "c.json").read_text(encoding="utf-8")
    assert text == '{\n  "name": "小李",\n  "n": [\n    1,\n    2\n  ]\n}\n'
    write_text(tmp_path / "t.txt", "é\n")
    assert (tmp_path / "t.txt").read_bytes() == "é\n".encode()
    assert read_json(tmp_path / "c.json")["name"] == "小李"


def test_read_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,,}')
    with pytest.raises(TinyloraError, match=r"bad\.json.*line 1"):
        read_json(bad)
    with pytest.raises(TinyloraError, match="missing.json"):
        read_json(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(TinyloraError, match="list.json.*object"):
        read_json(tmp_path / "list.json")


def test_atomic_folder(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as staging:
        (staging / "config.json").write_text("{}")
    assert (target / "config.json").exists() and leftovers(tmp_path) == []

    with pytest.raises(TinyloraError, match="model.*not empty"):
        with atomic_folder(target):
            pass
    with pytest.raises(RuntimeError):
        with atomic_folder(target, overwrite=True) as staging:
            (staging / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash mid-import")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"] and leftovers(tmp_path) == []

    with atomic_folder(target, overwrite=True) as staging:
        (staging / "new.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["new.json"] and leftovers(tmp_path) == []


def test_inside_rejects_escaping_names(tmp_path):
    assert inside(tmp_path, "model-00001-of-00002.safetensors") == tmp_path / "model-00001-of-00002.safetensors"
    assert inside(tmp_path, "sub/x.safetensors") == tmp_path / "sub" / "x.safetensors"
    for name in ["../x.safetensors", "sub/../../x", "/etc/passwd", "", "a\\..\\..\\b", "x\x00y"]:
        with pytest.raises(TinyloraError, match=str(tmp_path).replace("\\", "\\\\")):
            inside(tmp_path, name)
    (tmp_path / "link").symlink_to(tmp_path.parent)
    with pytest.raises(TinyloraError, match="outside"):
        inside(tmp_path, "link/evil.safetensors")


def test_atomic_folder_puts_the_old_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:                       # old moved aside; now the new one fails to move in
            raise OSError("disk trouble")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="disk trouble"):
        with atomic_folder(target, overwrite=True) as staging:
            (staging / "new.txt").write_text("new")
    assert (target / "old.txt").read_text() == "old" and not (target / "new.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_folder_recovers_from_a_kill_between_the_renames(tmp_path):
    # What a SIGKILL between the two renames leaves: the old folder aside, no target, a staging folder.
    aside = tmp_path / ".model.old-x1"
    (aside / "model").mkdir(parents=True)
    (aside / "model" / "old.txt").write_text("old")
    (tmp_path / ".model.partial-x2").mkdir()
    with pytest.raises(TinyloraError, match="already exists"):
        with atomic_folder(tmp_path / "model"):
            pass
    assert (tmp_path / "model" / "old.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
