"""The command line: `tinylora gradcheck`, `tinylora bench kernels --help`, `tinylora demo`."""

import pytest

from tinylora.cli import main


def test_gradcheck_command_prints_a_passing_table(capsys):
    assert main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    assert "attention (GQA, pad, cache)" in out and "rmsnorm" in out
    assert "all ok" in out and "FAILED" not in out


def test_gradcheck_verbose_shows_every_number(capsys):
    assert main(["gradcheck", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "== swiglu ==" in out and "direction" in out and "analytic" in out


def test_help_is_complete(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    assert "GFLOP/s" in capsys.readouterr().out


@pytest.mark.parametrize("command, words", [("demo", "identity"), ("train", "--no-mask-prompt"),
                                            ("fuse", "--save-path"), ("generate", "--top-p")])
def test_every_command_has_complete_help(capsys, command, words):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and words in capsys.readouterr().out


def test_train_checks_the_data_before_loading_the_model(tmp_path, capsys):
    # the model path is bad too, but the data is read first: a bad line fails fast, not after a slow load
    _one_line_error(capsys, ["train", "--model", str(tmp_path / "nope"), "--data", str(tmp_path)], "no train.jsonl")


# ---- bad input: one line on stderr, exit status 2, no traceback ----------------------------------
def _one_line_error(capsys, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert words in err, err


@pytest.mark.parametrize("flag, value, message", [
    ("--learning-rate", "0", "--learning-rate must be a number > 0, got 0.0"),
    ("--learning-rate", "-1e-4", "--learning-rate must be a number > 0, got -0.0001"),
    ("--rank", "0", "--rank must be a whole number >= 1, got 0"),
    ("--rank", "-4", "--rank must be a whole number >= 1, got -4"),
    ("--alpha", "0", "--alpha must be a number > 0, got 0.0"),
    ("--batch-size", "0", "--batch-size must be a whole number >= 1, got 0"),
    ("--iters", "-5", "--iters must be a whole number >= 1, got -5"),
    ("--dropout", "1.5", "LoRA dropout must be in [0, 1), got 1.5"),
    ("--max-seq-length", "1", "--max-seq-length must be a whole number >= 2, got 1")])
def test_bad_training_settings_fail_before_anything_is_read_or_written(tmp_path, capsys, flag, value, message):
    out = tmp_path / "adapter"
    assert main(["train", "--data", str(tmp_path / "no-data"), "--adapter-path", str(out), f"{flag}={value}"]) == 2
    assert capsys.readouterr().err.strip() == f"tinylora train: error: {message}"
    assert not out.exists()


def test_a_failed_run_leaves_earlier_work_byte_for_byte(tmp_path, capsys):
    """A bad data line or bad settings fail before the earlier adapter in --adapter-path is touched."""
    out = tmp_path / "adapter"
    out.mkdir()
    earlier = {"adapter_config.json": b'{"r": 8}\n', "adapter_model.safetensors": b"earlier bytes",
               "train_log.jsonl": b'{"step": 1}\n'}
    for name, content in earlier.items():
        (out / name).write_bytes(content)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    assert main(["train", "--data", str(data), "--adapter-path", str(out)]) == 2
    assert "train.jsonl:2: " in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--adapter-path", str(out), "--rank=0"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier


def test_internal_errors_exit_1_in_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    import tinylora.cli.commands as cli

    def broken(args):
        raise ZeroDivisionError("division by zero")
    monkeypatch.setattr(cli, "_cmd_info", broken)
    assert main(["info"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("tinylora info: internal error: ZeroDivisionError: division by zero (this is a bug; "
                   "--debug shows the traceback)")
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "info"])


def _qwen2_folder(path, **change):
    import json
    import numpy as np
    from tinylora.config import ModelConfig
    from tinylora.formats.safetensors import write_safetensors
    from tinylora.model import random_state_dict
    config = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 8, "intermediate_size": 12,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 16}
    path.mkdir()
    write_safetensors(path / "model.safetensors",
                      random_state_dict(ModelConfig.from_dict(config), np.random.default_rng(0)))
    (path / "config.json").write_text(json.dumps(config | change))
    return path


def test_missing_model_folder(tmp_path, capsys):
    _one_line_error(capsys, ["info", "--model", str(tmp_path / "nope")], "nope")


def test_folder_without_config(tmp_path, capsys):
    _one_line_error(capsys, ["info", "--model", str(tmp_path)], "config.json")


def test_unsupported_architecture(tmp_path, capsys):
    folder = _qwen2_folder(tmp_path / "m", architectures=["MambaForCausalLM"])
    _one_line_error(capsys, ["info", "--model", str(folder)], "not supported")


def test_corrupt_safetensors(tmp_path, capsys):
    folder = _qwen2_folder(tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])          # truncated
    _one_line_error(capsys, ["info", "--model", str(folder)], "model.safetensors")


def test_missing_tokenizer(tmp_path, capsys):
    folder = _qwen2_folder(tmp_path / "m")
    _one_line_error(capsys, ["generate", "--model", str(folder), "--prompt", "hi"], "tokenizer.json")


def test_gguf_of_unsupported_architecture(tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    import numpy as np
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _one_line_error(capsys, ["import-gguf", str(path), str(tmp_path / "out")], "gpt2")
    assert not (tmp_path / "out").exists()


def test_info_counts_logical_parameters_and_reports_bytes_per_storage(tmp_path, capsys):
    import numpy as np

    from tinylora.config import ModelConfig
    from tinylora.formats.files import write_json
    from tinylora.formats.safetensors import write_safetensors
    from tinylora.model import random_state_dict
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
              "tie_word_embeddings": True}
    write_json(tmp_path / "config.json", config)
    state = random_state_dict(ModelConfig.from_dict(config), np.random.default_rng(0))
    write_safetensors(tmp_path / "model.safetensors", state)
    matrices = sum(a.size for a in state.values() if a.ndim == 2)
    vectors = sum(a.size for a in state.values() if a.ndim == 1)
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        assert main(["info", "--model", str(tmp_path), "--dtype", dtype]) == 0
        outputs[dtype] = capsys.readouterr().out
    total = f"{matrices + vectors:,}"
    for o in outputs.values():
        assert total in o.split("total", 1)[1].splitlines()[0]          # logical counts, whatever the storage
    assert f"float32 {4 * (matrices + vectors) / 2**10:,.1f} KiB" in outputs["float32"]
    assert f"bfloat16 {2 * matrices / 2**10:,.1f} KiB, float32 {4 * vectors / 2**10:,.1f} KiB" in outputs["bfloat16"]
    assert main(["info", "--model", str(tmp_path), "--quantize", "nf4"]) == 0      # and per group, as stored
    out = capsys.readouterr().out
    mlp = sum(a.size for n, a in state.items() if ".mlp." in n)
    line = next(line for line in out.splitlines() if line.strip().startswith("mlp"))
    assert f"{mlp:,}" in line and f"nf4 {(mlp // 2 + mlp // 64 * 4) / 2**10:,.1f} KiB" in line   # 4 bits + 4 bytes / 64
