"""Training data: JSONL files in, padded (input_ids, labels, attention_mask) batches out.

In reading order: load (files -> checked JSON objects), encode (-> ids and labels, the prompt
masked, cut to max_seq_length), batch (-> padded arrays, in an order fixed by seed and step).

Data: a folder holding `train.jsonl` and optionally `valid.jsonl` and `test.jsonl`, or a single
`.jsonl` file (the train split alone). Each line is one JSON object in one of four formats, the
same on every line of a file: {"text"}, {"prompt", "completion"}, {"messages": [{"role":
"system" | "user" | "assistant", "content"}, ...]}, or Alpaca's {"instruction", "input", "output"}
(input optional, may be "").

A UTF-8 BOM and CRLF line endings are accepted; blank lines are skipped. Keys that no format
uses ("id", "source", a message's "name" or "weight") are ignored, as mlx-lm ignores them; keys
that would change what the model should see but that we cannot honour ("tools", "tool_calls")
are an error, not silently dropped. Every mistake is one TinyloraError naming file:line and field.

What is trained (labels != -100) with mask_prompt=True: for the three chat-like formats, every
token the chat template writes after the prompt, where the prompt is the conversation without
its last message, rendered with add_generation_prompt=True. That is the final assistant reply
plus what the template closes it with: for ChatML (Qwen2, SmolLM2) the reply, `<|im_end|>` and
the newline after it; for Llama 3 the reply and `<|eot_id|>`. The end-of-turn token must be
learned, or the model never learns to stop; mlx-lm trains the same span. Earlier assistant turns
of a multi-turn chat are context, not targets. Text examples are trained on every token.

Not here: tool calls, multimodal content, packing several examples into one row (train/packing.py), streaming
datasets too large for memory, and the Hugging Face `datasets` library.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from ..errors import TinyloraError
from ..tokenizer import Tokenizer

IGNORE = -100                  # the label cross-entropy skips (PyTorch's ignore_index)
SPLITS = ("train", "valid", "test")
ROLES = ("system", "user", "assistant")

# A line's format is the one whose keys it uses (so {"prompt": ...} alone is a prompt/completion
# line missing its completion, not an unknown format). Every key is required but "input".
FORMATS = {"text": ("text",), "prompt/completion": ("prompt", "completion"), "messages": ("messages",),
           "instruction/input/output": ("instruction", "input", "output")}
OPTIONAL_KEYS = ("input",)
UNSUPPORTED_KEYS = ("tools", "tool_calls")
LENGTH_BUCKET = 50             # batches per length-sorted bucket, as Hugging Face's LengthGroupedSampler


def _json_type(value) -> str:
    # The JSON name of a parsed value's type, for messages a JSON author understands.
    return {dict: "object", list: "array", str: "string", bool: "boolean",
            int: "number", float: "number", type(None): "null"}.get(type(value), type(value).__name__)


# ---- checking one example ----------------------------------------------------------------

def _string(obj: dict, key: str, where: str, label: str | None = None, optional: bool = False) -> None:
    label = label or key
    if key not in obj:
        if optional:
            return
        raise TinyloraError(f"{where}: missing field '{label}'")
    if not isinstance(obj[key], str):
        raise TinyloraError(f"{where}: field '{label}' must be a string, got {_json_type(obj[key])}")
    if not obj[key] and not optional:
        raise TinyloraError(f"{where}: field '{label}' is empty")


def _refuse_unsupported(obj: dict, where: str, prefix: str) -> None:
    # Dropping these would silently train on a different conversation than the file describes.
    for key in UNSUPPORTED_KEYS:
        if key in obj:
            raise TinyloraError(f"{where}: field '{prefix}{key}' is not supported "
                                f"(tinylora trains plain conversations)")


def check_example(obj, where: str = "example") -> str:
    """Check one parsed JSON line; return its format name or raise TinyloraError naming `where`."""
    if not isinstance(obj, dict):
        raise TinyloraError(f"{where}: expected a JSON object, found {_json_type(obj)}")
    used = [name for name, keys in FORMATS.items() if set(obj) & set(keys)]
    if not used:
        known = ", ".join("{" + ", ".join(f'"{key}"' for key in keys) + "}" for keys in FORMATS.values())
        raise TinyloraError(f"{where}: unknown format, keys {sorted(obj)}; expected one of {known}")
    if len(used) > 1:
        raise TinyloraError(f"{where}: keys of two formats ({' and '.join(used)}) in one example")
    _refuse_unsupported(obj, where, "")
    for key in FORMATS[used[0]]:
        if key == "messages":
            _check_messages(obj["messages"], where)
        else:
            _string(obj, key, where, optional=key in OPTIONAL_KEYS)
    return used[0]


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if messages == [] else _json_type(messages)
        raise TinyloraError(f"{where}: field 'messages' must be a non-empty list of messages, got {got}")
    for i, message in enumerate(messages):
        label = f"messages[{i}]"
        if not isinstance(message, dict):
            raise TinyloraError(f"{where}: field '{label}' must be an object with 'role' and 'content', "
                                f"got {_json_type(message)}")
        _string(message, "role", where, f"{label}.role")
        if message["role"] not in ROLES:
            raise TinyloraError(f"{where}: field '{label}.role' is {message['role']!r}; "
                                f"expected one of {', '.join(ROLES)}")
        _string(message, "content", where, f"{label}.content")
        _refuse_unsupported(message, where, f"{label}.")
    # The last message is what gets trained, so it has to be the assistant's reply, after a prompt.
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise TinyloraError(f"{where}: field 'messages' has no assistant turn (nothing to train)")
    if roles[-1] != "assistant":
        raise TinyloraError(f"{where}: field 'messages' ends with a {roles[-1]} turn; the last message must be "
                            f"the assistant's reply, which is what is trained")
    if len(roles) == 1:
        raise TinyloraError(f"{where}: field 'messages' holds only the assistant's reply; it needs a user "
                            f"(or system) message before it")


# ---- loading files -------------------------------------------------------------------------

class Split(list):
    """One file's examples (the JSON objects as read, each checked), a list that also
    remembers its file, its format and each example's line number, for error messages."""

    def __init__(self, name: str, path: Path, fmt: str, examples: list[dict], lines: list[int]):
        super().__init__(examples)
        self.name, self.path, self.format, self.lines = name, path, fmt, lines

    def where(self, i: int) -> str:
        return f"{self.path}:{self.lines[i]}"


def load_jsonl(path: str | Path, name: str = "train") -> Split:
    """Read and check one JSONL file: every line one example, all in one format."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TinyloraError(f"{path}: cannot read: {e.strerror}") from None
    data = data.removeprefix(b"\xef\xbb\xbf")                 # a UTF-8 BOM (Windows editors write one)
    examples, lines, fmt, first = [], [], None, 0
    # Split on b"\n" only: str.splitlines() would also break at U+2028 and other separators,
    # which JSON allows unescaped inside a string. A CRLF line keeps its "\r", which JSON
    # reads as whitespace. Lines are parsed unstripped so error columns match an editor's.
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TinyloraError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line)") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TinyloraError(f"{where}: malformed JSON at column {e.colno}: {e.msg}") from None
        line_format = check_example(obj, where)
        if fmt is None:
            fmt, first = line_format, number
        elif line_format != fmt:
            raise TinyloraError(f"{where}: a {line_format} example in a file of {fmt} examples "
                                f"(line {first}); one file holds one format")
        examples.append(obj)
        lines.append(number)
    if not examples:
        raise TinyloraError(f"{path}: empty file (no examples)")
    return Split(name, path, fmt, examples, lines)


def load_dataset(path: str | Path) -> dict[str, Split]:
    """A data folder (train.jsonl, optional valid.jsonl and test.jsonl) or one JSONL file
    (train only) -> {"train": Split, ...}, holding only the splits that exist."""
    path = Path(path)
    if path.is_file():
        return {"train": load_jsonl(path, "train")}
    if not path.exists():
        raise TinyloraError(f"{path}: no such data file or folder")
    if not (path / "train.jsonl").is_file():
        raise TinyloraError(f"{path}: no train.jsonl (a data folder holds train.jsonl, and optionally "
                            f"valid.jsonl and test.jsonl)")
    return {name: load_jsonl(path / f"{name}.jsonl", name) for name in SPLITS if (path / f"{name}.jsonl").is_file()}


# ---- tokenizing, with the prompt masked --------------------------------------------------

class Tokenized(NamedTuple):
    ids: list[int]          # (T,) token ids
    labels: list[int]       # (T,) the id where that token is trained, IGNORE where it is not


def to_messages(example: dict) -> list[dict]:
    """The conversation an example stands for: completions and Alpaca become one user turn and
    one assistant turn (no system message: the template adds its default, as at inference)."""
    if "messages" in example:
        return [{"role": m["role"], "content": m["content"]} for m in example["messages"]]
    if "prompt" in example:
        user, reply = example["prompt"], example["completion"]
    else:
        extra = example.get("input") or ""
        user = example["instruction"] + ("\n\n" + extra if extra else "")     # Alpaca's layout
        reply = example["output"]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def _chat(tokenizer: Tokenizer, messages, where: str, **kwargs):
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except TinyloraError as e:               # the template refused this conversation: say which line
        raise TinyloraError(f"{where}: {e}") from None


def encode_example(example: dict, tokenizer: Tokenizer, mask_prompt: bool = True,
                   where: str = "example") -> Tokenized:
    """One example -> (ids, labels); labels are IGNORE on the prompt when mask_prompt.

    The ids do not depend on mask_prompt (only which of them are trained does), except for a
    template whose prompt is not a prefix of the whole: unmasked, it trains on the whole as is.
    """
    fmt = check_example(example, where)
    if fmt == "text":
        ids = tokenizer.encode(example["text"])             # with BOS if the tokenizer adds one
        eos = tokenizer.eos_token_id
        if eos is not None and ids[-1:] != [eos]:            # so the model learns where text ends
            ids.append(eos)
        return Tokenized(ids, list(ids))

    if tokenizer.chat_template is None:
        raise TinyloraError(f"{where}: {fmt} examples go through the model's chat template, and "
                            f"{tokenizer.source or 'this tokenizer'} has none; write them as {{\"text\": ...}}")
    messages = to_messages(example)
    full = _chat(tokenizer, messages, where)
    prompt = _chat(tokenizer, messages[:-1], where, add_generation_prompt=True)
    if full[:len(prompt)] != prompt:
        # BPE can merge across the seam: a prompt ending in "assistant: " and a reply "Hi" give
        # "Ġ" at the prompt's end but "ĠHi" in the whole. If the texts still line up, keep the
        # prompt's own ids and encode the rest after them: exactly the ids the model sees at
        # inference, the prompt first and then its own tokens.
        full_text = _chat(tokenizer, messages, where, tokenize=False)
        prompt_text = _chat(tokenizer, messages[:-1], where, add_generation_prompt=True, tokenize=False)
        if full_text.startswith(prompt_text):
            full = prompt + tokenizer.encode(full_text[len(prompt_text):], add_special_tokens=False)
        elif mask_prompt:   # e.g. a template that renders earlier turns differently once a reply follows
            raise TinyloraError(f"{where}: the chat template renders the prompt (the conversation without its "
                                f"last reply) differently from the start of the full conversation, so the "
                                f"prompt cannot be masked; train with --no-mask-prompt")
    n_prompt = len(prompt) if mask_prompt else 0
    return Tokenized(full, [IGNORE] * n_prompt + full[n_prompt:])


@dataclass
class TokenizedSplit:
    """A split ready for batching, with the counts worth reporting once."""
    name: str
    source: str                        # the file it came from, for messages
    examples: list[Tokenized]
    pad_id: int                        # the id padding is written with (never trained or attended to)
    max_seq_length: int | None = None
    truncated: int = 0                 # examples cut to max_seq_length (kept)
    dropped: int = 0                   # examples left with no trained token after the cut (left out)
    lengths: np.ndarray = field(init=False)

    def __post_init__(self):
        self.lengths = np.array([len(e.ids) for e in self.examples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.examples)

    def summary(self) -> str:
        """One line: examples, tokens, and what truncation did."""
        trained = sum(sum(label != IGNORE for label in e.labels[1:]) for e in self.examples)
        line = f"{self.name}: {len(self)} examples, {int(self.lengths.sum()):,} tokens ({trained:,} trained)"
        if self.truncated:
            line += f"; {self.truncated} truncated to {self.max_seq_length} tokens"
        if self.dropped:
            line += f"; {self.dropped} dropped (no token left to train)"
        return line


def pad_id_for(tokenizer: Tokenizer) -> int:
    """The pad token, else EOS, else 0. The value is arbitrary (labels and mask hide it) but a
    real id keeps the embedding lookup in range."""
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)


def encode_split(split: Split, tokenizer: Tokenizer, mask_prompt: bool = True,
                 max_seq_length: int | None = None) -> TokenizedSplit:
    """Encode every example; cut each to its first max_seq_length tokens (as mlx-lm does) and
    drop those whose trained tokens were all cut away. Counts, not per-line warnings."""
    if max_seq_length is not None and (isinstance(max_seq_length, bool) or not isinstance(
            max_seq_length, (int, np.integer)) or max_seq_length < 2):
        raise TinyloraError(f"max_seq_length must be at least 2 (one token to read, one to predict), "
                            f"got {max_seq_length!r}")
    examples, truncated, dropped = [], 0, 0
    for i, example in enumerate(split):
        ids, labels = encode_example(example, tokenizer, mask_prompt, where=split.where(i))
        if max_seq_length is not None and len(ids) > max_seq_length:
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
            truncated += 1
        if all(label == IGNORE for label in labels[1:]):   # labels[0] is never a target (next-token shift)
            dropped += 1
            continue
        examples.append(Tokenized(ids, labels))
    if not examples:
        raise TinyloraError(f"{split.path}: no example has a token left to train after cutting to "
                            f"max_seq_length {max_seq_length}; raise --max-seq-length")
    return TokenizedSplit(split.name, str(split.path), examples, pad_id_for(tokenizer), max_seq_length,
                          truncated, dropped)


# ---- batching ------------------------------------------------------------------------------

class Batch(NamedTuple):
    input_ids: np.ndarray          # (B, T) int64, right-padded with the pad id
    labels: np.ndarray             # (B, T) int64, IGNORE on masked prompt tokens and on padding
    attention_mask: np.ndarray     # (B, T) int64, 1 on real tokens, 0 on padding (packed: 1, 2, ... per example)
    position_ids: np.ndarray | None = None   # (B, T) int64 in a packed batch (train/packing.py), else None


def collate(examples: list[Tokenized], pad_id: int, pad_to_multiple: int = 1) -> Batch:
    """Right-pad a list of examples to the longest (rounded up to a multiple of pad_to_multiple)."""
    longest = max(len(e.ids) for e in examples)
    T = -(-longest // pad_to_multiple) * pad_to_multiple
    input_ids = np.full((len(examples), T), pad_id, dtype=np.int64)
    labels = np.full((len(examples), T), IGNORE, dtype=np.int64)
    attention_mask = np.zeros((len(examples), T), dtype=np.int64)
    for row, (ids, row_labels) in enumerate(examples):
        input_ids[row, :len(ids)] = ids
        labels[row, :len(ids)] = row_labels
        attention_mask[row, :len(ids)] = 1
    return Batch(input_ids, labels, attention_mask)


def count_targets(labels: np.ndarray) -> int:
    """(B, T) labels -> how many tokens the loss counts (labels[:, 1:] != IGNORE), for tokens/s."""
    return int((np.asarray(labels)[:, 1:] != IGNORE).sum())


def batches_per_epoch(n_examples: int, batch_size: int, shuffle: bool = True) -> int:
    """Training drops the n % batch_size left over (different ones each epoch); evaluation keeps them."""
    return n_examples // batch_size if shuffle else -(-n_examples // batch_size)


def epoch_order(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                group_by_length: bool = False) -> list[np.ndarray]:
    """The batches (arrays of example indices) of one training epoch, a pure function of
    (seed, epoch): resuming needs no saved generator state, only the step.

    group_by_length: sort each bucket of LENGTH_BUCKET shuffled batches by length, so a batch
    holds examples of similar length and pads less, then shuffle the batches' order."""
    rng = np.random.default_rng([seed, epoch])
    n_batches = len(lengths) // batch_size
    order = rng.permutation(len(lengths))[:n_batches * batch_size]
    if group_by_length:
        bucket = LENGTH_BUCKET * batch_size
        order = np.concatenate([chunk[np.argsort(-lengths[chunk], kind="stable")]
                                for chunk in np.split(order, list(range(bucket, len(order), bucket)))])
    batches = np.split(order, n_batches)
    return [batches[i] for i in rng.permutation(n_batches)] if group_by_length else batches


def iterate_batches(data: TokenizedSplit, batch_size: int, seed: int = 0, shuffle: bool = True,
                    start_step: int = 0, group_by_length: bool = False,
                    pad_to_multiple: int = 1) -> Iterator[Batch]:
    """Batches of `data`, starting at global step `start_step`.

    shuffle=True (training): full batches in a fresh order every epoch, endlessly; take as many
    as you need (itertools.islice). Step k is batch k % n of epoch k // n (n = batches per epoch),
    so a resumed run sees exactly the batches the uninterrupted one would have.
    shuffle=False (evaluation): one pass in file order; the last batch may be smaller.
    pad_to_multiple=1 pads only to the longest row: on a CPU a padded column costs as much as
    a real one, and rounding to 8 helps only GPU tensor cores.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise TinyloraError(f"batch size must be a positive integer, got {batch_size!r}")
    if shuffle and batch_size > len(data):
        raise TinyloraError(f"batch size {batch_size} is larger than the {len(data)} examples in "
                            f"{data.name} ({data.source}); lower --batch-size or add examples")
    n = batches_per_epoch(len(data), batch_size, shuffle)
    # Generators from here on; the checks above run at the call, before anything is trained.
    if shuffle:      # epoch_order is recomputed per step: a permutation costs far less than a step
        batches = (epoch_order(data.lengths, batch_size, seed, step // n, group_by_length)[step % n]
                   for step in itertools.count(start_step))
    else:
        batches = (np.arange(i, min(i + batch_size, len(data)))
                   for i in range(start_step * batch_size, len(data), batch_size))
    return (collate([data.examples[i] for i in indices], data.pad_id, pad_to_multiple) for indices in batches)
