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
    heads = [w for w in rows if w.seq == 128 and w.dtype == "bfloat16"]
    assert {(w.kind, w.model, w.targets) for w in heads} == {
        ("train", "smollm2", tuple(ALL_SEVEN)), ("train", "smollm2", ("q_proj", "v_proj")),
        ("train", "qwen2.5-0.5b", tuple(ALL_SEVEN)), ("decode", "smollm2", tuple(ALL_SEVEN)),
        ("decode", "qwen2.5-0.5b", tuple(ALL_SEVEN))}
    assert sorted(w.seq for w in rows if w.kind == "train" and w.targets == tuple(ALL_SEVEN)
                  and w.model == "smollm2" and w.dtype == "bfloat16") == [128, 512, 1024, 2048]
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
