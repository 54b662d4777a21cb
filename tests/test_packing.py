"""Packing (`train --pack`): rows of several examples whose loss and gradients are the unpacked run's.

The oracle is the unpacked batch itself: the same examples, one per padded row, through the same model.
Packed, the summed per-token loss and every LoRA gradient must be equal (float64, to rounding), because
attention stays inside each example (segment ids as the mask), RoPE positions restart per example and
the label at each example's start is ignored.
"""

import json

import numpy as np
import pytest
from test_trainer import config as train_config
from test_trainer import data, tiny_model, tok  # noqa: F401 (fixtures)

import tinylora as tl
from tinylora.config import ModelConfig
from tinylora.errors import TinyloraError
from tinylora.lora import LoraConfig, apply_lora, lora_layers, lora_parameters
from tinylora.model import CausalLM, random_state_dict
from tinylora.train import train
from tinylora.train.data import IGNORE, Tokenized, TokenizedSplit, collate, count_targets
from tinylora.train.packing import collate_packed, iterate_packed_batches, pack_rows, packed_epoch

RAW = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "vocab_size": 64, "tie_word_embeddings": True, "rope_theta": 100.0}


def lora_model(arch, dtype=np.float64, dropout=0.0):
    config = ModelConfig.from_dict({**RAW, "architectures": [arch]})
    model = CausalLM.from_state_dict(config, random_state_dict(config, np.random.default_rng(0), std=0.2), dtype=dtype)
    apply_lora(model, LoraConfig(r=2, alpha=4, target_modules="all-linear", dropout=dropout), seed=1)
    rng = np.random.default_rng(2)
    for _, layer in lora_layers(model):
        layer.lora_B.weight.data = (0.1 * rng.standard_normal(layer.lora_B.weight.shape)).astype(dtype)
    model.train(True)
    for _, p in lora_parameters(model):
        p.requires_grad = True
    return model


def examples(rng, lengths):
    out = []
    for n in lengths:
        ids = rng.integers(4, 64, n).tolist()
        labels = [IGNORE] * (n // 3) + ids[n // 3:]                     # a masked prompt, then the reply
        out.append(Tokenized(ids, labels))
    return out


def loss_and_grads(model, batch):
    for _, p in lora_parameters(model):
        p.grad = None
    loss = model.loss(batch.input_ids, batch.labels, batch.attention_mask, batch.position_ids)
    loss.backward()
    n = count_targets(batch.labels)
    return loss.item() * n, n, {name: p.grad * n for name, p in lora_parameters(model)}   # sums, not means


def test_a_packed_row_holds_each_example_as_it_was():
    ex = examples(np.random.default_rng(0), [4, 3, 2])
    batch = collate_packed([ex], pad_id=0)
    assert batch.input_ids[0].tolist() == ex[0].ids + ex[1].ids + ex[2].ids
    assert batch.attention_mask[0].tolist() == [1] * 4 + [2] * 3 + [3] * 2
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]
    assert batch.labels[0].tolist() == [IGNORE] + ex[0].labels[1:] + [IGNORE] + ex[1].labels[1:] + \
        [IGNORE] + ex[2].labels[1:]
    assert pack_rows(np.array([5, 4, 3, 6, 1]), np.array([0, 1, 2, 3, 4]), max_len=9) == [[0, 1], [2, 3], [4]]
    assert pack_rows(np.array([9, 9]), np.array([1, 0]), max_len=9) == [[1], [0]]


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "LlamaForCausalLM"])
def test_packed_loss_and_gradients_are_the_unpacked_ones(arch):
    ex = examples(np.random.default_rng(1), [7, 5, 9, 4, 6, 3])
    model = lora_model(arch)
    unpacked = loss_and_grads(model, collate(ex, pad_id=0))
    packed = loss_and_grads(model, collate_packed([ex[:3], ex[3:]], pad_id=0))
    assert packed[1] == unpacked[1]                                      # the same tokens are trained
    assert packed[0] == pytest.approx(unpacked[0], rel=1e-12)
    for name, g in unpacked[2].items():
        np.testing.assert_allclose(packed[2][name], g, rtol=1e-10, atol=1e-12, err_msg=name)
    # and float32, to float32's rounding
    model32 = lora_model(arch, dtype=np.float32)
    a, b = loss_and_grads(model32, collate(ex, 0)), loss_and_grads(model32, collate_packed([ex[:3], ex[3:]], 0))
    assert b[0] == pytest.approx(a[0], rel=1e-5)
    for name, g in a[2].items():
        np.testing.assert_allclose(b[2][name], g, rtol=1e-3, atol=1e-5 * np.abs(g).max(), err_msg=name)


def test_packed_logits_per_example_are_the_example_run_alone():
    ex = examples(np.random.default_rng(3), [5, 6, 4])
    model = lora_model("LlamaForCausalLM")
    batch = collate_packed([ex], pad_id=0)
    with tl.no_grad():
        packed = model(batch.input_ids, batch.attention_mask, position_ids=batch.position_ids).data[0]
        start = 0
        for e in ex:
            alone = model(np.array([e.ids])).data[0]
            np.testing.assert_allclose(packed[start:start + len(e.ids)], alone, rtol=1e-12, atol=1e-12)
            start += len(e.ids)


def test_packed_epochs_are_a_function_of_seed_and_epoch_and_resume_mid_epoch():
    ex = examples(np.random.default_rng(4), [3, 8, 2, 5, 7, 4, 6, 2, 9, 3])
    split = TokenizedSplit("train", "mem", ex, 0, 16)
    first = packed_epoch(split, 2, seed=5, epoch=0, max_len=16)
    assert first == packed_epoch(split, 2, seed=5, epoch=0, max_len=16) != packed_epoch(split, 2, 5, 1, 16)
    assert all(sum(len(ex[i].ids) for i in row) <= 16 for batch in first for row in batch)
    stream = iterate_packed_batches(split, 2, 16, seed=5)
    all_batches = [next(stream) for _ in range(7)]                       # across the epoch boundary
    resumed = iterate_packed_batches(split, 2, 16, seed=5, start_step=4)
    for want in all_batches[4:]:
        got = next(resumed)
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
    with pytest.raises(TinyloraError, match="--pack: the 10 examples of train .* fill only 4 rows of 16 tokens, "
                                            "fewer than --batch-size 5"):
        iterate_packed_batches(split, 5, 16)


def test_training_with_pack_trains_and_resumes(tok, data, tmp_path):  # noqa: F811
    out = tmp_path / "packed"
    kw = dict(pack=True, max_seq_length=256, batch_size=1, iters=6, save_every=3, steps_per_eval=3)
    result = train(train_config(data, out, **kw), tiny_model(tok), tok, progress=False, log=lambda *a: None)
    losses = [loss for _, loss in result.train_losses]
    assert len(losses) == 6 and np.mean(losses[-2:]) < losses[0]
    saved = json.loads((out / "checkpoint" / "trainer_state.json").read_text())["config"]
    assert saved["pack"] is True
    with pytest.raises(TinyloraError, match="--resume: pack was True in the checkpointed run, now False"):
        train(train_config(data, out, **{**kw, "pack": False}, resume=True), tiny_model(tok), tok,
              progress=False, log=lambda *a: None)
