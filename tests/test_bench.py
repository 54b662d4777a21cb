"""`tinylora bench`: its FLOP count, its table and target lines, its workers. No timing assertions:
figures come from the benchmark itself (SPEC §4), these tests check the arithmetic and the plumbing."""

import pytest

from tinylora.bench import side_by_side as bench
from tinylora.bench.workers import ALL_SEVEN, Workload
from tinylora.config import ModelConfig

TINY = {"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 10}


def test_train_flops_per_token_by_hand():
    config = ModelConfig.from_dict(TINY)
    # per layer: q 8x8, k 8x4, v 8x4, o 8x8, gate/up/down 8x12 -> 64+32+32+64+3*96 = 480 weights; lm_head 80
    frozen = 2 * 480 + 80
    lora_qv = 2 * 6 * 8 * ((8 + 8) + (8 + 4))                  # two layers, q (8->8) and v (8->4)
    attention = 2 * 3 * 4 * 8 * (16 + 1) / 2                     # T = 16, H*D = 8
    assert bench.train_flops_per_token(config, ["q_proj", "v_proj"], 8, 16) == 4 * frozen + lora_qv + attention
    more = bench.train_flops_per_token(config, ALL_SEVEN, 8, 16)
    assert more > bench.train_flops_per_token(config, ["q_proj", "v_proj"], 8, 16)


def test_workloads_cover_the_spec():
    rows = bench.workloads()
    names = [w.name for w in rows]
    assert len(set(names)) == len(names)
    heads = [w for w in rows if w.seq == 128 and w.dtype == "bfloat16" and not w.base and w.compute == "float32"]
    assert {(w.kind, w.model, w.targets) for w in heads} == {
        ("train", "smollm2", tuple(ALL_SEVEN)), ("train", "smollm2", ("q_proj", "v_proj")),
        ("train", "qwen2.5-0.5b", tuple(ALL_SEVEN)), ("decode", "smollm2", tuple(ALL_SEVEN)),
        ("decode", "qwen2.5-0.5b", tuple(ALL_SEVEN))}
    assert sorted(w.seq for w in rows if w.kind == "train" and w.targets == tuple(ALL_SEVEN)
                  and w.model == "smollm2" and w.dtype == "bfloat16" and not w.base and w.compute == "float32"
                  ) == [128, 512, 1024, 2048]
    based = {(w.kind, w.model, w.base): w.peers for w in rows if w.base}        # the QLoRA rows
    assert based == {("train", "smollm2", "Q4_K_M"): ("tinylora-bf16",),
                     ("train", "smollm2", "nf4"): ("tinylora-bf16", "peft-bnb4"),
                     ("train", "llama-2-7b", "nf4"): (),
                     ("decode", "smollm2", "Q8_0"): ("tinylora-bf16", "llama.cpp"),
                     ("decode", "smollm2", "Q4_K_M"): ("tinylora-bf16", "llama.cpp")}
    assert max(w.seq for w in bench.workloads(max_seq=512)) == 512


def _row(name, kind, ours, peer, rss=(1.0, 2.0), mfu=None, seq=128):
    row = {"workload": name, "kind": kind, "seq": seq, "gemm_gflops": 200.0,
           "tinylora": {"tokens_per_s": ours, "peak_rss_gb": rss[0], "error": None, "versions": "tinylora x"},
           "peft": {"tokens_per_s": peer, "peak_rss_gb": rss[1], "error": None, "versions": "torch y"},
           "speed_ratio": ours / peer, "rss_ratio": rss[0] / rss[1]}
    if mfu is not None:
        row["tinylora"]["mfu"], row["peft"]["mfu"] = mfu
    return row


def test_table_and_targets():
    result = {"machine": {"cpu": "Test CPU", "cores": 2, "python": "3.x", "blas": "blas: test", "env": {}},
              "rows": [_row("train A", "train", 130.0, 100.0, rss=(0.5, 1.0), mfu=(0.65, 0.5)),
                       _row("train B", "train", 110.0, 100.0, rss=(0.7, 1.0), mfu=(0.55, 0.5)),
                       _row("decode C", "decode", 50.0, 20.0),
                       _row("train A long", "train", 10.0, 100.0, seq=2048)]}
    table = bench.format_table(result)
    assert "| train A | 130.0 | 100.0 | 1.30× | 0.50 GB | 1.00 GB | 0.50× | 65 % | 50 % |" in table
    assert "Test CPU, 2 cores" in table and "tinylora x" in table and "torch y" in table
    lines = bench.check_targets(result)
    assert "met   train A: speed 1.30× (target ≥ 1.2×)" in lines
    assert "MISS  train B: speed 1.10× (target ≥ 1.2×)" in lines
    assert "MISS  train B: peak RSS 0.70× (target ≤ 0.6×)" in lines
    assert "MISS  train B: MFU 55 % (target ≥ 60 %)" in lines
    assert "met   decode C: speed 2.50× (target ≥ 2.0×)" in lines
    assert not any("long" in line for line in lines)             # targets are set at 2 x 128 only


def test_quantised_rows_table_and_targets():
    def side(tps, rss):
        return {"tokens_per_s": tps, "peak_rss_gb": rss, "error": None, "versions": "v"}
    rows = [{"workload": "train Q", "kind": "train", "model": "smollm2", "seq": 128, "base": "nf4",
             "gemm_gflops": 200.0, "tinylora": side(90.0, 0.4), "tinylora-bf16": side(100.0, 1.0),
             "ratios": {"tinylora-bf16": {"speed": 0.9, "rss": 0.4}}},
            {"workload": "decode G", "kind": "decode", "model": "smollm2", "seq": 128, "base": "Q8_0",
             "gemm_gflops": 200.0, "tinylora": side(120.0, 0.3), "llama.cpp": side(160.0, 0.2),
             "ratios": {"llama.cpp": {"speed": 0.75, "rss": 1.5}}},
            {"workload": "train 7B", "kind": "train", "model": "llama-2-7b", "seq": 256, "base": "nf4",
             "gemm_gflops": 200.0, "tinylora": side(4.0, 5.5), "ratios": {}}]
    table = bench.format_table({"machine": {"cpu": "C", "cores": 2, "python": "3", "blas": "b", "env": {}},
                                "rows": rows})
    assert "| train Q | 90.0 | tinylora, bf16 base | 100.0 | 0.90× | 0.40 GB | 1.00 GB | 0.40× |" in table
    assert "met   train Q: speed 0.90× tinylora, bf16 base (target ≥ 0.85×)" in table
    assert "met   train Q: rss 0.40× tinylora, bf16 base (target ≤ 0.5×)" in table
    assert "MISS  decode G: speed 0.75× llama.cpp (target ≥ 0.8×)" in table
    assert "met   train 7B: peak RSS 5.50 GB (target ≤ 6 GB), 4.0 tokens/s" in table


def test_peers_start_without_the_environment_tinylora_sets(monkeypatch):
    import os

    import tinylora.kernels
    before = tinylora.kernels.THREADING_BEFORE
    monkeypatch.setitem(before, "OMP_WAIT_POLICY", None)
    monkeypatch.setitem(before, "GOMP_SPINCOUNT", None)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("GOMP_SPINCOUNT", "3000")
    with bench.peer_environment():
        assert "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and os.environ["GOMP_SPINCOUNT"] == "3000"
    monkeypatch.setitem(before, "OMP_WAIT_POLICY", "ACTIVE")                     # the user's own choice
    with bench.peer_environment():
        assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and "GOMP_SPINCOUNT" not in os.environ
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and os.environ["GOMP_SPINCOUNT"] == "3000"
    assert bench.machine()["env"].get("OMP_WAIT_POLICY") == "ACTIVE"             # the table shows the user's
    assert "GOMP_SPINCOUNT" not in bench.machine()["env"]


def test_a_peers_process_sees_the_users_environment_not_tinyloras(monkeypatch):
    """A spawned peer (as run_workload starts one) re-imports tinylora, whose kernels set OMP_WAIT_POLICY
    and GOMP_SPINCOUNT; what the peer's library then reads is exactly the user's environment."""
    import multiprocessing
    import os

    import tinylora.kernels
    from tinylora.bench import workers
    before = tinylora.kernels.THREADING_BEFORE
    users = {k: v for k, v in workers.threading_environment().items() if k not in before}
    users.update({k: v for k, v in before.items() if v is not None})
    assert os.environ.get("OMP_WAIT_POLICY") and os.environ.get("GOMP_SPINCOUNT")   # tinylora's, here
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    with bench.peer_environment():
        process = ctx.Process(target=workers.report_peer_environment, args=(child,))
        process.start()
    try:
        assert parent.recv() == users
    finally:
        process.join(60)


def test_native_blas_unsets_the_openblas_overrides_for_tinyloras_workers_only():
    environ = {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_L2_SIZE": "1048576"}    # a copy: the real one untouched
    with bench.tinylora_environment(native_blas=True, environ=environ):
        assert "OPENBLAS_CORETYPE" not in environ and "OPENBLAS_L2_SIZE" not in environ
    assert environ["OPENBLAS_CORETYPE"] == "Haswell" and environ["OPENBLAS_L2_SIZE"] == "1048576"
    with bench.tinylora_environment(native_blas=False, environ=environ):
        assert environ["OPENBLAS_CORETYPE"] == "Haswell"


def test_a_worker_reports_its_own_peak_memory_not_its_parents():
    """Linux carries ru_maxrss across fork and exec: a worker started by a large process reported at
    least the parent's size (every row of one run read 0.89 GB). peak_memory_gb is the worker's own."""
    import subprocess
    import sys

    import numpy as np

    from tinylora.generate import peak_memory_gb
    held = np.ones(1 << 27)                                      # 1 GiB, resident in this (the parent) process
    child = subprocess.run([sys.executable, "-c", "from tinylora.generate import peak_memory_gb as p; print(p())"],
                           capture_output=True, text=True, check=True)
    assert peak_memory_gb() > 1.0 > 0.5 > float(child.stdout) > 0.0
    del held


def test_a_failing_worker_is_a_table_cell_not_a_crash():
    """A workload that cannot be built reports its error in the row; the bench goes on."""
    row = bench.run_workload(Workload("broken", "train", "no-such-model"), repeats=1, model_dir=None, peer=False)
    assert row["tinylora"]["tokens_per_s"] is None and row["tinylora"]["peak_rss_gb"] is None
    assert "no-such-model" in row["tinylora"]["error"] or "Error" in row["tinylora"]["error"]
    assert "broken" in bench.format_row(row) and "tinylora:" in bench.format_row(row)


@pytest.mark.slow
def test_one_decode_workload_side_by_side(smollm2_dir):
    """The real thing on the cheapest workload, with the peer if it is installed."""
    peer = bench.peer_available() is None
    w = Workload("decode", "decode", "smollm2", new=8)
    row = bench.run_workload(w, repeats=2, model_dir=str(smollm2_dir), peer=peer)
    assert row["tinylora"]["error"] is None and len(row["tinylora"]["repeats"]) == 2
    assert row["tinylora"]["tokens_per_s"] > 0 and row["tinylora"]["peak_rss_gb"] > 0.1
    if peer:
        assert row["peft"]["error"] is None and row["speed_ratio"] > 0 and row["rss_ratio"] > 0


def test_a_gguf_row_without_llama_cpp_is_a_table_cell(monkeypatch, tmp_path):
    from tinylora.bench import quantised
    from tinylora.errors import TinyloraError

    def no_llama_cpp(model_dir, kind):
        raise TinyloraError("writing SmolLM2-135M-Instruct.Q8_0.gguf needs llama.cpp's quantiser")
    monkeypatch.setattr(quantised, "ensure_gguf", no_llama_cpp)
    w = next(w for w in quantised.workloads() if w.base == "Q8_0")
    row = bench.run_workload(w, repeats=1, model_dir=str(tmp_path / "SmolLM2"), peer=True)
    assert row["tinylora"]["tokens_per_s"] is None and "needs llama.cpp" in row["tinylora"]["error"]
    assert "needs llama.cpp" in "\n".join(quantised.format_rows([row]))


def test_bf16_compute_rows_meet_both_pytorch_setups_where_the_cpu_has_bf16(monkeypatch):
    monkeypatch.setattr(bench, "has_bf16_cpu", lambda: True)
    rows = [w for w in bench.workloads() if w.compute == "bfloat16"]
    assert {w.model for w in rows} == {"smollm2", "qwen2.5-0.5b"}
    assert all(w.kind == "train" and w.peers == ("peft", "peft-bf16") and w.seq == 128 for w in rows)
    monkeypatch.setattr(bench, "has_bf16_cpu", lambda: False)
    assert not [w for w in bench.workloads() if w.compute == "bfloat16"]
