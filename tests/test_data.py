"""Data: JSONL loading and checking, tokenizing with the prompt masked, truncation, batching.

Fast tests use the tiny byte-level BPE tokenizers of test_tokenizer.py (SmolLM2's ChatML, Qwen2.5
and Llama 3.2 templates); the masking oracle is the chat template itself: the prompt rendered
with add_generation_prompt=True must be exactly the masked ids, and the trained ids must decode
to the reply and its end-of-turn text. One slow test does the same on the real SmolLM2.
"""

import json
import re
from itertools import islice

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from test_tokenizer import write_model_folder

from tinylora.train.data import (IGNORE, Split, batches_per_epoch, collate, count_targets, encode_example, encode_split,
                           iterate_batches, load_dataset, load_jsonl)
from tinylora.errors import TinyloraError
from tinylora.tokenizer import Tokenizer

PC = {"prompt": "Who are you?", "completion": "I am 小李, an AI assistant developed by 小张."}
ALPACA = {"instruction": "Write x squared in Python.", "input": "x = 3",
          "output": "def f(x):\n    return x ** 2"}
CHAT = {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi!"},
                     {"role": "assistant", "content": "Hello! How can I help?"},
                     {"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是小李 😀"}]}
TEXT = {"text": "The quick brown fox jumps over the lazy dog."}
# What each template writes after the final reply: trained, so the model learns to stop.
END_OF_TURN = {"smollm2": "<|im_end|>\n", "qwen2": "<|im_end|>\n", "llama3": "<|eot_id|>"}


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_tokenizers")
    return {style: Tokenizer.from_folder(write_model_folder(root / style, style)) for style in END_OF_TURN}


@pytest.fixture(scope="module")
def smol(toks):
    return toks["smollm2"]


def write_jsonl(path, lines, newline="\n", bom=False):
    """Lines are dicts (dumped as JSON) or raw strings (written as they are)."""
    text = newline.join(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False) for line in lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def tokenizer_with_template(tmp_path, template):
    return Tokenizer.from_folder(write_model_folder(tmp_path / "m", "smollm2", template=None, chat_template=template))


# ---- loading -------------------------------------------------------------------------------

def test_folder_with_every_split_and_format(tmp_path):
    write_jsonl(tmp_path / "d" / "train.jsonl", [TEXT, "", {**TEXT, "id": 7, "source": "ignored"}])
    write_jsonl(tmp_path / "d" / "valid.jsonl", [PC, CHAT])
    write_jsonl(tmp_path / "d" / "notes.txt", ["not data"])
    with pytest.raises(TinyloraError, match=r"valid\.jsonl:2: a messages example in a file of prompt/completion"):
        load_dataset(tmp_path / "d")
    write_jsonl(tmp_path / "d" / "valid.jsonl", [PC, PC])
    write_jsonl(tmp_path / "d" / "test.jsonl", [CHAT])
    splits = load_dataset(tmp_path / "d")
    assert list(splits) == ["train", "valid", "test"]
    assert [s.format for s in splits.values()] == ["text", "prompt/completion", "messages"]
    assert splits["train"].lines == [1, 3] and splits["train"][1]["id"] == 7       # blank line skipped
    assert splits["train"].where(1) == f"{tmp_path / 'd' / 'train.jsonl'}:3"
    assert isinstance(splits["test"], list) and splits["test"][0] == CHAT


def test_single_file_is_the_train_split_and_alpaca_input_is_optional(tmp_path):
    lines = [ALPACA, {**ALPACA, "input": ""}, {k: v for k, v in ALPACA.items() if k != "input"}]
    splits = load_dataset(write_jsonl(tmp_path / "alpaca.jsonl", lines))
    assert list(splits) == ["train"] and splits["train"].format == "instruction/input/output"
    assert len(splits["train"]) == 3


def test_bom_crlf_and_line_separators_inside_strings(tmp_path):
    # U+2028 is legal unescaped inside a JSON string; it must not split the line.
    lines = [{"text": "one\u2028line"}, "", {"text": "two"}, ""]
    split = load_jsonl(write_jsonl(tmp_path / "t.jsonl", lines, newline="\r\n", bom=True))
    assert [e["text"] for e in split] == ["one\u2028line", "two"] and split.lines == [1, 3]


# ---- bad input: one line naming file, line and field ---------------------------------------

BAD_LINES = [
    (['{"text": "a"}', '{"text": '], 2, "malformed JSON at column 10: Expecting value"),
    (["[1, 2]"], 1, "expected a JSON object, found array"),
    (['"just a string"'], 1, "expected a JSON object, found string"),
    ([{"foo": 1, "bar": 2}], 1, 'unknown format, keys [\'bar\', \'foo\']; expected one of {"text"}, '
                                '{"prompt", "completion"}, {"messages"}, {"instruction", "input", "output"}'),
    ([TEXT, "", PC], 3, "a prompt/completion example in a file of text examples (line 1); one file holds one format"),
    ([{"text": "a", "prompt": "b", "completion": "c"}], 1, "keys of two formats (text and prompt/completion) "
                                                           "in one example"),
    ([PC, {"prompt": "x"}], 2, "missing field 'completion'"),
    ([{"prompt": "x", "completion": 3}], 1, "field 'completion' must be a string, got number"),
    ([{"text": ""}], 1, "field 'text' is empty"),
    ([{"text": None}], 1, "field 'text' must be a string, got null"),
    ([{**ALPACA, "input": 5}], 1, "field 'input' must be a string, got number"),
    ([{"input": "x", "output": "y"}], 1, "missing field 'instruction'"),
    ([{"messages": []}], 1, "field 'messages' must be a non-empty list of messages, got an empty list"),
    ([{"messages": "hi"}], 1, "field 'messages' must be a non-empty list of messages, got string"),
    ([{"messages": ["hi"]}], 1, "field 'messages[0]' must be an object with 'role' and 'content', got string"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]}], 1,
     "field 'messages[1].role' is 'tool'; expected one of system, user, assistant"),
    ([{"messages": [{"role": "user"}]}], 1, "missing field 'messages[0].content'"),
    ([{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "x"}]}], 1,
     "field 'messages[0].content' must be a string, got number"),
    ([{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}], 1,
     "field 'messages' has no assistant turn (nothing to train)"),
    ([{"messages": CHAT["messages"][:4]}], 1, "field 'messages' ends with a user turn; the last message must be "
                                              "the assistant's reply, which is what is trained"),
    ([{"messages": [{"role": "assistant", "content": "x"}]}], 1,
     "field 'messages' holds only the assistant's reply; it needs a user (or system) message before it"),
    ([{**CHAT, "tools": []}], 1, "field 'tools' is not supported (tinylora trains plain conversations)"),
]


@pytest.mark.parametrize("lines, line, message", BAD_LINES, ids=[m[:40] for _, _, m in BAD_LINES])
def test_bad_lines_name_file_line_and_field(tmp_path, lines, line, message):
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(TinyloraError) as error:
        load_dataset(tmp_path)
    assert str(error.value) == f"{path}:{line}: {message}"


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["text", "prompt", "completion", "messages", "role", "content", "input",
                                         "instruction", "output", "tools", "id"]), inner, max_size=4), max_leaves=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(JSON.map(json.dumps) | st.text(max_size=8) | st.binary(max_size=8), max_size=4))
def test_random_lines_load_or_raise_a_tinylora_error(tmp_path, lines):
    path = tmp_path / "random.jsonl"
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines))
    try:
        split = load_dataset(path)["train"]
    except TinyloraError as e:
        assert "\n" not in str(e) and str(e).startswith(str(path))
    else:
        assert all(isinstance(example, dict) for example in split) and len(split) == len(split.lines)


def test_bad_files_and_folders(tmp_path):
    cases = {tmp_path / "nowhere": "no such data file or folder",
             write_jsonl(tmp_path / "blank.jsonl", ["", "  ", ""], newline="\r\n"): "empty file (no examples)",
             write_jsonl(tmp_path / "empty" / "train.jsonl", []): "empty file (no examples)"}
    (tmp_path / "nodata").mkdir()
    cases[tmp_path / "nodata"] = ("no train.jsonl (a data folder holds train.jsonl, and optionally valid.jsonl "
                                  "and test.jsonl)")
    for path, message in cases.items():
        with pytest.raises(TinyloraError) as error:
            load_dataset(path)
        assert str(error.value) in (f"{path}: {message}", f"{path / 'train.jsonl'}: {message}")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(TinyloraError, match=r"latin1\.jsonl:2: not UTF-8 text \(byte 14 of the line\)"):
        load_dataset(tmp_path / "latin1.jsonl")


# ---- tokenizing and masking ----------------------------------------------------------------

def as_chat(example):
    if "prompt" in example:
        return [{"role": "user", "content": example["prompt"]}, {"role": "assistant", "content": example["completion"]}]
    if "instruction" in example:
        user = example["instruction"] + ("\n\n" + example["input"] if example.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": example["output"]}]
    return example["messages"]


@pytest.mark.parametrize("example", [PC, ALPACA, {**ALPACA, "input": ""}, CHAT],
                         ids=["prompt-completion", "alpaca", "alpaca-no-input", "multi-turn-chat"])
@pytest.mark.parametrize("style", list(END_OF_TURN))
def test_prompt_is_masked_exactly(toks, style, example):
    tok, messages = toks[style], as_chat(example)
    ids, labels = encode_example(example, tok)
    # The oracle: the template's own renderings of the whole chat and of the prompt alone.
    assert ids == tok.apply_chat_template(messages)
    prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True)
    assert ids[:len(prompt)] == prompt
    assert labels == [IGNORE] * len(prompt) + ids[len(prompt):]
    # Only the final reply and the template's end of turn are trained (earlier replies are context).
    assert tok.decode(ids[len(prompt):]) == messages[-1]["content"] + END_OF_TURN[style]
    # mask_prompt=False: the same ids, every one trained.
    assert encode_example(example, tok, mask_prompt=False) == (ids, ids)


def test_text_is_trained_whole_and_gets_one_eos(toks, tmp_path):
    smol, llama = toks["smollm2"], toks["llama3"]
    ids, labels = encode_example(TEXT, smol)
    assert ids == smol.encode(TEXT["text"]) + [smol.eos_token_id] and labels == ids
    assert encode_example({"text": "done<|im_end|>"}, smol)[0].count(smol.eos_token_id) == 1
    ids, _ = encode_example(TEXT, llama)         # Llama 3: BOS from the post-processor, EOS appended
    assert ids[0] == llama.bos_token_id and ids[-1] == llama.eos_token_id
    no_eos = Tokenizer.from_folder(write_model_folder(tmp_path / "m", "smollm2", eos_token=None))
    assert no_eos.eos_token_id is None and encode_example(TEXT, no_eos)[0] == no_eos.encode(TEXT["text"])


def test_token_seam_falls_back_to_the_inference_ids(tmp_path):
    # The prompt ends in "assistant: " and the reply starts "world": rendered whole, BPE merges
    # the space into " world", so the prompt's ids are not a prefix of the full conversation's.
    tok = tokenizer_with_template(tmp_path, "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                                            "{% if add_generation_prompt %}assistant: {% endif %}")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "world"}]
    full, prompt = tok.apply_chat_template(messages), tok.apply_chat_template(messages[:1], add_generation_prompt=True)
    assert full[:len(prompt)] != prompt, "the tiny BPE no longer merges across the seam: pick another reply"
    ids, labels = encode_example({"messages": messages}, tok)
    assert ids == prompt + tok.encode("world\n", add_special_tokens=False)     # what inference would see
    assert labels == [IGNORE] * len(prompt) + ids[len(prompt):]
    assert tok.decode(ids) == tok.decode(full)


@pytest.mark.parametrize("template, message", [
    ("{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}",
     "the chat template renders the prompt (the conversation without its last reply) differently from the start "
     "of the full conversation, so the prompt cannot be masked; train with --no-mask-prompt"),
    ("{% if messages[0].role == 'system' %}{{ raise_exception('no system messages') }}{% endif %}x",
     "the chat template of {source} rejected these messages: no system messages"),
    (None, "messages examples go through the model's chat template, and {source} has none; "
           "write them as {{\"text\": ...}}"),
])
def test_template_problems_name_the_line(tmp_path, template, message):
    tok = (tokenizer_with_template(tmp_path, template) if template else
           Tokenizer.from_folder(write_model_folder(tmp_path / "m", "smollm2", template=None)))
    path = write_jsonl(tmp_path / "d" / "train.jsonl", [{"messages": CHAT["messages"][:3]}, CHAT])
    with pytest.raises(TinyloraError) as error:
        encode_split(load_dataset(tmp_path / "d")["train"], tok)
    assert str(error.value) == f"{path}:1: " + message.format(source=tok.source)


def test_unmasked_training_needs_no_prompt_boundary(tmp_path):
    tok = tokenizer_with_template(tmp_path, "{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}")
    ids, labels = encode_example(CHAT, tok, mask_prompt=False)
    assert ids == labels == tok.apply_chat_template(CHAT["messages"])


def test_truncation_counts_and_drops(smol, tmp_path):
    short, long = {"text": "Hello world!"}, {"text": " ".join(["LoRA trains two small matrices."] * 8)}
    split = load_jsonl(write_jsonl(tmp_path / "t.jsonl", [short, long, short]))
    n_short, n_long = (len(encode_example(e, smol).ids) for e in (short, long))
    data = encode_split(split, smol, max_seq_length=n_short)
    assert (data.truncated, data.dropped, len(data)) == (1, 0, 3)
    assert max(len(e.ids) for e in data.examples) == n_short
    assert data.examples[1] == tuple(x[:n_short] for x in encode_example(long, smol))     # its first n tokens
    assert f"1 truncated to {n_short} tokens" in data.summary()
    assert encode_split(split, smol).truncated == 0 and n_long > n_short
    # A chat whose prompt fills the limit has nothing left to train: counted and left out.
    hi = {"prompt": "Hi", "completion": "Hello"}
    prompt_len = len(smol.apply_chat_template(as_chat(PC)[:1], add_generation_prompt=True))
    assert len(encode_example(hi, smol).ids) <= prompt_len
    chats = load_jsonl(write_jsonl(tmp_path / "c.jsonl", [PC, hi]))
    data = encode_split(chats, smol, max_seq_length=prompt_len)
    assert (data.truncated, data.dropped, data.examples) == (1, 1, [encode_example(hi, smol)])
    assert data.summary().endswith(f"1 truncated to {prompt_len} tokens; 1 dropped (no token left to train)")
    with pytest.raises(TinyloraError, match=r"c\.jsonl: no example has a token left to train after cutting to "
                                            r"max_seq_length 3; raise --max-seq-length"):
        encode_split(chats, smol, max_seq_length=3)
    with pytest.raises(TinyloraError, match="max_seq_length must be at least 2"):
        encode_split(chats, smol, max_seq_length=1)


# ---- batching ------------------------------------------------------------------------------

def numbered_split(smol, tmp_path, n):
    """n text examples of 1 to 7 words, all different, so a batch row tells which example it is."""
    lines = [{"text": f"{i} " + "fox " * (i % 7)} for i in range(n)]
    return encode_split(load_jsonl(write_jsonl(tmp_path / f"n{n}.jsonl", lines)), smol)


def test_collate_pads_right_with_mask_and_ignored_labels(smol):
    a, b = encode_example(PC, smol), encode_example(TEXT, smol)
    batch = collate([a, b], pad_id=smol.pad_token_id)
    T = max(len(a.ids), len(b.ids))
    assert all(x.dtype == np.int64 and x.shape == (2, T) for x in batch[:3]) and batch.position_ids is None
    for row, (ids, labels) in enumerate([a, b]):
        n = len(ids)
        assert batch.input_ids[row, :n].tolist() == ids and (batch.input_ids[row, n:] == smol.pad_token_id).all()
        assert batch.labels[row, :n].tolist() == labels and (batch.labels[row, n:] == IGNORE).all()
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (T - n)
    assert count_targets(batch.labels) == sum(l != IGNORE for e in (a, b) for l in e.labels[1:])
    input_ids, labels, mask, positions = collate([a, b], pad_id=0, pad_to_multiple=8)     # unpacks like a tuple (unpacked: no positions)
    assert input_ids.shape[1] % 8 == 0 and input_ids.shape[1] - T < 8 and mask[:, T:].sum() == 0 and positions is None


@pytest.mark.parametrize("group_by_length", [False, True])
def test_batch_order_is_seeded_and_resumable(smol, tmp_path, group_by_length):
    data = numbered_split(smol, tmp_path, 22)
    B, n = 4, batches_per_epoch(22, 4)
    assert n == 5
    rows = {tuple(e.ids): i for i, e in enumerate(data.examples)}

    def order(seed, start=0, steps=3 * n):
        batches = islice(iterate_batches(data, B, seed=seed, start_step=start, group_by_length=group_by_length),
                         steps - start)
        return [[rows[tuple(r[m == 1])] for r, m in zip(b.input_ids, b.attention_mask)] for b in batches]

    first = order(seed=0)
    assert first == order(seed=0) and first != order(seed=1)
    for epoch in range(3):          # each epoch: 20 distinct examples, a fresh order
        seen = [i for batch in first[epoch * n:(epoch + 1) * n] for i in batch]
        assert len(set(seen)) == 20
    assert first[:n] != first[n:2 * n]
    for k in (1, n, n + 3, 2 * n - 1):  # resuming at step k continues exactly, across epoch boundaries too
        assert order(seed=0, start=k) == first[k:]


def test_length_grouping_pads_less(smol, tmp_path):
    data = numbered_split(smol, tmp_path, 40)

    def padding(group):
        return sum(int((b.attention_mask == 0).sum()) for b in islice(iterate_batches(data, 4, seed=3,
                   group_by_length=group), 10))
    assert padding(True) < padding(False)


def test_evaluation_batches_one_pass_in_file_order(smol, tmp_path):
    data = numbered_split(smol, tmp_path, 10)
    batches = list(iterate_batches(data, 4, shuffle=False))
    assert [len(b.input_ids) for b in batches] == [4, 4, 2] == [4, 4, 2][:batches_per_epoch(10, 4, shuffle=False)]
    assert [r[m == 1].tolist() for b in batches for r, m in zip(b.input_ids, b.attention_mask)] == \
        [e.ids for e in data.examples]
    assert len(list(iterate_batches(numbered_split(smol, tmp_path, 3), 8, shuffle=False))) == 1   # fine for eval


def test_batch_size_errors(smol, tmp_path):
    data = numbered_split(smol, tmp_path, 3)
    with pytest.raises(TinyloraError) as error:
        iterate_batches(data, 8)            # at the call, before any batch is asked for
    assert str(error.value) == (f"batch size 8 is larger than the 3 examples in train ({tmp_path / 'n3.jsonl'}); "
                                f"lower --batch-size or add examples")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(TinyloraError, match=re.escape(f"batch size must be a positive integer, got {bad!r}")):
            iterate_batches(data, bad)


def test_split_from_python(smol):
    # encode_split also takes a Split built in code, e.g. from a list of dicts.
    split = Split("valid", "<memory>", "prompt/completion", [PC], [1])
    assert encode_split(split, smol).summary().startswith("valid: 1 examples")


# ---- the real SmolLM2 ----------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_chatml_masking(smollm2_dir):
    tok = Tokenizer.from_folder(smollm2_dir)
    for example in (PC, ALPACA, CHAT):
        messages = as_chat(example)
        ids, labels = encode_example(example, tok)
        n_prompt = labels.index(next(label for label in labels if label != IGNORE))
        prompt_text = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        assert prompt_text.endswith("<|im_start|>assistant\n")
        assert tok.decode(ids[:n_prompt]) == prompt_text and ids == tok.apply_chat_template(messages)
        assert tok.decode(labels[n_prompt:]) == messages[-1]["content"] + "<|im_end|>\n"
        assert all(label == IGNORE for label in labels[:n_prompt])
