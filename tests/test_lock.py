"""One training run per adapter folder (formats/lock.py): a second run is refused in one line naming the
folder, pid and host, and touches nothing; a dead run's lock is taken over; fuse and export refuse to
write into a held folder. The two-run case runs two real `tinylora train` processes."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from test_to_gguf import QWEN2, adapter_folder, base_folder
from test_trainer import config as train_config
from test_trainer import data, tiny_model, tok  # noqa: F401 (fixtures)

from tinylora.cli import main
from tinylora.errors import TinyloraError
from tinylora.formats.lock import LOCK_FILE, check_not_held, holder, run_lock
from tinylora.train import train


def dead_pid():
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_held_folder_refuses_a_second_run_and_is_released(tmp_path):
    folder = tmp_path / "ad"
    with run_lock(folder, log=lambda *a: None):
        info = json.loads((folder / LOCK_FILE).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        other = dict(info, pid=os.getppid())                 # a live process that is not us
        (folder / LOCK_FILE).write_text(json.dumps(other))
        with pytest.raises(TinyloraError, match=rf"{folder}: a tinylora training run \(pid {os.getppid()} on this "
                                                r"machine, started .*\) holds this folder; wait for it"):
            with run_lock(folder, log=lambda *a: None):
                pass
        with pytest.raises(TinyloraError, match="holds this folder; fuse into another folder"):
            check_not_held(folder, "fuse into another folder")
        (folder / LOCK_FILE).write_text(json.dumps(info))
    assert not (folder / LOCK_FILE).exists() and not folder.exists()      # released; the empty folder removed


def test_a_dead_runs_lock_is_taken_over_with_a_note(tmp_path):
    folder = tmp_path / "ad"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "started": "x"}))
    assert holder(folder) is None
    notes = []
    with run_lock(folder, log=notes.append):
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert notes and "taking over the lock of a run that is gone" in notes[0]
    (folder / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "x"}))
    with pytest.raises(TinyloraError, match="on host elsewhere.example"):     # cannot tell: refuse
        with run_lock(folder, log=notes.append):
            pass


def test_training_holds_its_folder_and_lets_go_on_an_error(tok, data, tmp_path, monkeypatch):  # noqa: F811
    from tinylora.train import trainer
    out = tmp_path / "ad"
    seen, step = [], trainer.train_step

    def watched(*args, **kwargs):
        seen.append(holder(out))
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", watched)
    result = train(train_config(data, out, iters=2, steps_per_eval=2, save_every=2), tiny_model(tok), tok,
                   progress=False, log=lambda *a: None)
    assert result.steps == 2 and not (out / LOCK_FILE).exists()
    assert seen and all(h is not None and h["pid"] == os.getpid() for h in seen)   # held while it ran
    with pytest.raises(TinyloraError, match="--resume: no checkpoint"):
        train(train_config(data, tmp_path / "new", resume=True), tiny_model(tok), tok, progress=False,
              log=lambda *a: None)
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_two_real_training_runs_on_one_folder(tmp_path, smollm2_dir):
    """A second `tinylora train` on the folder of a running one exits 2 at once, naming the first's pid;
    the first run finishes and its adapter loads."""
    out = tmp_path / "ad"
    data_dir = os.path.join(os.path.dirname(__file__), "..", "tinylora", "cli", "demo_data", "identity")
    cmd = [sys.executable, "-m", "tinylora.cli", "train", "--model", str(smollm2_dir), "--data", data_dir,
           "--iters", "6", "--batch-size", "1", "--adapter-path", str(out), "--steps-per-eval", "100",
           "--save-every", "3", "--val-batches", "1"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / LOCK_FILE).exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else ""
            time.sleep(0.05)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"pid {first.pid} on this machine" in second.stderr and second.stderr.count("\n") == 1
        assert main(["export", "--to", "mlx", "--adapter-path", str(out), "--out", str(out / "mlx")]) == 2
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        first.kill()
    assert not (out / LOCK_FILE).exists() and (out / "adapter_model.safetensors").is_file()


def test_fuse_and_export_refuse_a_held_folder(tmp_path, capsys):
    base = base_folder(tmp_path, QWEN2)
    adapter, _ = adapter_folder(tmp_path, base)
    held = tmp_path / "held"
    held.mkdir()
    (held / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "x"}))
    for argv in (["fuse", "--model", str(base), "--adapter-path", str(adapter), "--save-path", str(held)],
                 ["fuse", "--model", str(base), "--adapter-path", str(adapter), "--save-path", str(held / "m.gguf")],
                 ["export", "--to", "gguf", "--adapter-path", str(adapter), "--out", str(held / "a.gguf")],
                 ["export", "--to", "mlx", "--adapter-path", str(adapter), "--out", str(held)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "holds this folder" in err and err.count("\n") == 1
    assert sorted(p.name for p in held.iterdir()) == [LOCK_FILE]
