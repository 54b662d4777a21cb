"""A local folder or a hub repo id -> a checked local folder (tinylora/formats/hub.py).

The machine has no hub access, so `huggingface_hub.snapshot_download` is
monkeypatched: on success it writes files into local_dir, on failure it raises
huggingface_hub's own exception types (offline, not found, gated).
"""

import types

import numpy as np
import pytest

from tinylora.errors import TinyloraError
from tinylora.formats import hub
from tinylora.formats.files import write_json
from tinylora.formats.safetensors import write_safetensors


# -- hub: local folders and repo ids ----------------------------------------------------------

def fake_model_folder(folder):
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", {"architectures": ["LlamaForCausalLM"]})
    write_safetensors(folder / "model.safetensors", {"w": np.zeros(1, np.float32)})
    write_json(folder / "tokenizer.json", {})
    return folder


def forbid_download(*args, **kwargs):
    raise AssertionError("snapshot_download must not be called")


def test_resolve_local_folder(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", forbid_download)
    folder = fake_model_folder(tmp_path / "m")
    assert hub.resolve_model(folder) == folder
    assert hub.resolve_model(str(folder)) == folder

    (tmp_path / "empty").mkdir()
    with pytest.raises(TinyloraError, match="empty: no config.json"):
        hub.resolve_model(tmp_path / "empty")
    with pytest.raises(TinyloraError, match="model.safetensors: is a file"):
        hub.resolve_model(folder / "model.safetensors")
    with pytest.raises(TinyloraError, match="tinylora download smollm2"):
        hub.resolve_model(tmp_path / "does" / "not" / "exist")
    # shaped like org/name, but its first part is a local folder: a path, not a repo id
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    with pytest.raises(TinyloraError, match="weights/SmolLM2-135M-Instruct: no such model folder"):
        hub.resolve_model("weights/SmolLM2-135M-Instruct")


def test_resolve_repo_id_uses_existing_download(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", forbid_download)
    fake_model_folder(tmp_path / "weights" / "Qwen2.5-0.5B-Instruct")
    assert hub.resolve_model("Qwen/Qwen2.5-0.5B-Instruct", weights_dir=tmp_path / "weights") == \
        tmp_path / "weights" / "Qwen2.5-0.5B-Instruct"


def test_resolve_repo_id_downloads_only_safe_files(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_snapshot_download(repo_id, local_dir, allow_patterns, **kwargs):
        calls.append((repo_id, local_dir, allow_patterns, kwargs))
        fake_model_folder(local_dir)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    path = hub.resolve_model("Qwen/Qwen2.5-0.5B-Instruct", weights_dir=tmp_path / "w")
    assert path == tmp_path / "w" / "Qwen2.5-0.5B-Instruct"
    (repo_id, local_dir, patterns, kwargs), = calls
    assert repo_id == "Qwen/Qwen2.5-0.5B-Instruct" and local_dir == path
    assert "config.json" in patterns and "*.safetensors" in patterns and "tokenizer.json" in patterns
    assert "model.safetensors.index.json" in patterns and "chat_template.jinja" in patterns
    assert not any(p.endswith((".bin", ".pt", ".pth", ".py", ".pkl", "*")) and p != "*.safetensors" for p in patterns)
    assert "trust_remote_code" not in kwargs


def hub_error(name):
    errors = pytest.importorskip("huggingface_hub.utils")
    cls = getattr(errors, name)
    if issubclass(cls, errors.HfHubHTTPError):
        return cls("404 Client Error.\n\nRepository Not Found for url: https://huggingface.co/api/models/x/y",
                   response=types.SimpleNamespace(headers={}, request=None))
    return cls("An error happened while trying to locate the files on the Hub.\nPlease check your connection.")


@pytest.mark.parametrize("error, words", [("LocalEntryNotFoundError", "offline"),
                                          ("RepositoryNotFoundError", "no such model"),
                                          ("GatedRepoError", "gated")])
def test_resolve_download_failures_are_one_line(tmp_path, monkeypatch, error, words):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    exc = hub_error(error)

    def failing(*args, **kwargs):
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(TinyloraError) as info:
        hub.resolve_model("someone/some-model", weights_dir=tmp_path / "weights")
    message = str(info.value)
    assert "\n" not in message and "someone/some-model" in message and words in message
    assert "tinylora download smollm2" in message


def test_resolve_download_without_safetensors(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def config_only(repo_id, local_dir, **kwargs):
        local_dir.mkdir(parents=True)
        write_json(local_dir / "config.json", {})

    monkeypatch.setattr(huggingface_hub, "snapshot_download", config_only)
    with pytest.raises(TinyloraError, match="no safetensors weights"):
        hub.resolve_model("org/pickled-model", weights_dir=tmp_path)


def test_repo_id_shape():
    assert hub.is_repo_id("Qwen/Qwen2.5-0.5B-Instruct") and hub.is_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    for name in ["model", "a/b/c", "../x", "org/..", "/abs/path", "org/", "org/na me"]:
        assert not hub.is_repo_id(name), name


@pytest.mark.parametrize("leave_out", ["model-00002-of-00002.safetensors", "tokenizer.json"])
def test_interrupted_download_is_resumed(tmp_path, monkeypatch, leave_out):
    # config.json, the shard index and one of two shards: not complete, so snapshot_download runs again.
    huggingface_hub = pytest.importorskip("huggingface_hub")
    folder = tmp_path / "weights" / "Qwen2.5-0.5B-Instruct"
    folder.mkdir(parents=True)
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    write_json(folder / "config.json", {"architectures": ["Qwen2ForCausalLM"]})
    write_json(folder / "model.safetensors.index.json", {"weight_map": {"a": shards[0], "b": shards[1]}})
    for name in shards + ["tokenizer.json"]:
        if name != leave_out:
            (folder / name).write_bytes(b"x")
    calls = []

    def resume(repo_id, local_dir, **kwargs):
        calls.append(repo_id)
        (local_dir / leave_out).write_bytes(b"x")
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", resume)
    assert hub.resolve_model("Qwen/Qwen2.5-0.5B-Instruct", weights_dir=tmp_path / "weights") == folder
    assert calls == ["Qwen/Qwen2.5-0.5B-Instruct"]
