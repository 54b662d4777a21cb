"""A GGUF file's tokenizer metadata -> a `tokenizers.Tokenizer` and tokenizer_config.json.

A GGUF carries no tokenizer.json. It stores the pieces instead:

    tokenizer.ggml.model       "gpt2": byte-level BPE (the only kind supported here)
    tokenizer.ggml.pre         which pre-tokenizer splits text before BPE ("smollm", "qwen2", ...)
    tokenizer.ggml.tokens      the vocabulary, id order
    tokenizer.ggml.token_type  1 normal, 3 control (<|im_start|>), 4 user-defined, ...
    tokenizer.ggml.merges      "Ġ t", "i n", ... in priority order
    tokenizer.ggml.*_token_id  bos / eos / unk / padding
    tokenizer.chat_template    the Jinja chat template

Byte-level BPE in four steps: (1) the pre-tokenizer cuts text into pieces
with a regular expression; (2) each piece's UTF-8 bytes are spelled with one
printable character per byte (GPT-2's table, so a space is "Ġ"); (3) BPE
applies the merges to each piece; (4) control tokens such as <|im_start|> are
matched whole before any of this, as special "added tokens".

Step (1) is the part a GGUF only names. We rebuild the pre-tokenizer the
model's original tokenizer.json had, which is also what llama.cpp runs for
that name (llama-vocab.cpp):

    gpt2     GPT-2's regex ('s|'t|...| ?\\p{L}+| ?\\p{N}+|...)
    smollm   every digit split off first (\\p{N}), then GPT-2's regex. SmolLM's
             tokenizer.json: Digits(individual_digits) + ByteLevel.
    qwen2    Qwen2's regex (single digits, letters with one leading non-letter),
             after NFC normalisation, as Qwen2's own tokenizer does
    llama-bpe  Llama 3's regex (digits in threes), merges ignored for whole-word hits

transformers' GGUF loader agrees on gpt2, qwen2 (it skips NFC) and llama-bpe
(it keeps merges), but has no "smollm" entry and falls back to GPT-2's regex
alone. The two differ only where a run of spaces precedes a digit ("x =  1"):
GPT-2's regex keeps one space with the digit, SmolLM's Digits step does not.
tests/test_gguf.py checks our split against llama.cpp's rule.

Writing goes the other way (tokenizer_fields, for a merged GGUF): the
vocabulary in id order, added tokens typed CONTROL (special) or USER_DEFINED,
the merges, the special ids, the template; and tokenizer.ggml.pre, the one
thing a tokenizer.json does not name, found by running each pre-tokenizer
above on a probe text and keeping the one that splits it as the model's does.

What is not here: sentencepiece ("llama") vocabularies, other pre-tokenizers,
the chat template's rendering (tokenizer.py).
"""

from __future__ import annotations

import json

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ..errors import TinyloraError

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5      # llama.cpp's token types (gguf.TokenType)

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gpt2():
    return None, [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]   # GPT2_SPLIT built in


def _smollm():
    return None, [pre_tokenizers.Digits(individual_digits=True),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]


def _split(regex: str, normalizer=None):
    return lambda: (normalizer, [pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# tokenizer.ggml.pre -> () -> (normalizer or None, [pre-tokenizers]); names as llama.cpp spells them.
PRE_TOKENIZERS = {
    "gpt2": _gpt2,
    "smollm": _smollm,
    "qwen2": _split(QWEN2_SPLIT, normalizers.NFC()),
    "deepseek-r1-qwen": _split(QWEN2_SPLIT, normalizers.NFC()),
    "llama-bpe": _split(LLAMA3_SPLIT),
    "llama3": _split(LLAMA3_SPLIT),
    "llama-v3": _split(LLAMA3_SPLIT),
}
IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3"}     # Llama 3's tokenizer.json sets ignore_merges


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table.

    Printable Latin-1 bytes stand for themselves; the other 68 (control
    characters, space, ...) are moved to U+0100 onwards, in byte order. So a
    space (0x20) is 'Ġ' (U+0120) and a newline (0x0A) is 'Ċ'.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer(meta) -> tuple[Tokenizer, dict]:
    """meta: gguf.Metadata -> (tokenizers.Tokenizer, tokenizer_config.json dict without model_max_length)."""
    path = meta.path
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise TinyloraError(f"{path}: tokenizer.ggml.model = {model!r} is not supported "
                            "(only byte-level BPE, 'gpt2', as in SmolLM2 and Qwen2)")
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre not in PRE_TOKENIZERS:
        raise TinyloraError(f"{path}: tokenizer.ggml.pre = {pre!r} is not supported "
                            f"(supported: {', '.join(PRE_TOKENIZERS)})")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    if len(types) != len(tokens):
        raise TinyloraError(f"{path}: {len(tokens)} tokens but {len(types)} token types")
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges")]
    bad = next((m for m in merges if len(m) != 2), None)
    if bad is not None:
        raise TinyloraError(f"{path}: tokenizer.ggml.merges has {' '.join(bad)!r}, not two pieces")

    # In a byte-level vocabulary every token is spelled in the byte alphabet;
    # one that is not (a literal space, say) is respelled, as transformers does.
    alphabet = bytes_to_unicode()
    letters = set(alphabet.values())
    spelled = [t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {token: i for i, token in enumerate(spelled)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in IGNORE_MERGES))
    normalizer, steps = PRE_TOKENIZERS[pre]()
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()

    # Control tokens are matched whole and are "special" (skipped by decode(skip_special_tokens=True));
    # a control token outside the byte alphabet is a llama.cpp mislabel and is left alone (as transformers does).
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == CONTROL and set(t) <= letters])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, types) if kind == USER_DEFINED and t in vocab])

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id", None)
        if i is not None and not 0 <= i < len(tokens):
            raise TinyloraError(f"{path}: tokenizer.ggml.{key}_token_id = {i} is outside the vocabulary")
        return None if i is None else tokens[i]

    bos, eos = token("bos"), token("eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    tokenizer.post_processor = _post_processor(tokenizer, bos if add_bos else None, eos if add_eos else None)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos, "pad_token": token("padding"), "unk_token": token("unknown"),
        "add_bos_token": add_bos, "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    template = meta.get("tokenizer.chat_template", None)
    if template is not None:
        config["chat_template"] = template
    return tokenizer, config


def _post_processor(tokenizer: Tokenizer, bos: str | None, eos: str | None):
    """BOS/EOS added around every encoded text, when the file asks for them (SmolLM2, Qwen2: neither)."""
    if bos is None and eos is None:
        return None
    single = ([bos] if bos else []) + ["$A"] + ([eos] if eos else [])
    pair = single + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
    specials = [(t, tokenizer.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


# --------------------------------------------------------------------------
# Writing: a tokenizers.Tokenizer -> GGUF's tokenizer.* keys
# --------------------------------------------------------------------------

# Digits alone and in runs, runs of spaces before a digit, contractions, letters after punctuation,
# accents, CJK, newlines: every place where the pre-tokenizers above split differently.
PROBE = ("Hello world!  It's 12345 apples, x =  1 and 3.14159;\n\n\tI'M HERE don't\r\n"
         "caf\u00e9 na\u0308ive \u4f60\u597d\uff0c\u4e16\u754c 2024-12-06 ...   $100 #tag @user 'quoted'")
_CANONICAL = ("gpt2", "smollm", "qwen2", "llama-bpe")


def detect_pre(backend: Tokenizer) -> str:
    """The tokenizer.ggml.pre name whose normalizer + pre-tokenizer split PROBE as `backend` does."""
    def pieces(normalizer, pre_tokenizer):
        text = normalizer.normalize_str(PROBE) if normalizer is not None else PROBE
        return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]

    if backend.pre_tokenizer is None:
        raise TinyloraError("the tokenizer has no pre-tokenizer; only byte-level BPE tokenizers can be written to GGUF")
    theirs = pieces(backend.normalizer, backend.pre_tokenizer)
    for name in _CANONICAL:
        normalizer, steps = PRE_TOKENIZERS[name]()
        if pieces(normalizer, pre_tokenizers.Sequence(steps)) == theirs:
            return name
    raise TinyloraError("the tokenizer's pre-tokenizer splits text unlike every one llama.cpp names here "
                        f"({', '.join(_CANONICAL)}); it cannot be written to GGUF")


def tokenizer_fields(backend: Tokenizer, special_tokens: dict[str, str], chat_template: str | None,
                     n_vocab: int) -> list[tuple]:
    """A byte-level BPE tokenizer -> [(key, value, GGUFValueType[, item type])], build_tokenizer's inverse.

    n_vocab: the embedding's rows; ids past the tokenizer's are written as unused "[PAD<i>]" entries,
    as convert_hf_to_gguf.py pads them."""
    from gguf import GGUFValueType as T
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE" or not isinstance(backend.decoder, decoders.ByteLevel):
        raise TinyloraError(f"the tokenizer is {model.get('type')}, not byte-level BPE; it cannot be written "
                            "to GGUF here")
    size = backend.get_vocab_size(with_added_tokens=True)
    if size > n_vocab:
        raise TinyloraError(f"the tokenizer has {size} tokens but the embedding only {n_vocab} rows")
    vocab = {i: t for t, i in backend.get_vocab(with_added_tokens=True).items()}
    added = backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(n_vocab):
        if i in vocab:
            tokens.append(vocab[i])
            types.append((CONTROL if added[i].special else USER_DEFINED) if i in added else NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = backend.encode("a", add_special_tokens=True).ids          # does the post-processor add BOS/EOS?
    ids = {key: backend.token_to_id(special_tokens[f"{key}_token"]) if special_tokens.get(f"{key}_token") else None
           for key in ("bos", "eos", "unk", "pad")}
    fields = [("tokenizer.ggml.model", "gpt2", T.STRING), ("tokenizer.ggml.pre", detect_pre(backend), T.STRING),
              ("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
              ("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
              ("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING)]
    for key, name in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        if ids[key] is not None:
            fields.append((f"tokenizer.ggml.{name}_token_id", ids[key], T.UINT32))
    fields += [("tokenizer.ggml.add_bos_token", ids["bos"] is not None and probe[:1] == [ids["bos"]], T.BOOL),
               ("tokenizer.ggml.add_eos_token", ids["eos"] is not None and probe[-1:] == [ids["eos"]], T.BOOL)]
    if chat_template is not None:
        fields.append(("tokenizer.chat_template", chat_template, T.STRING))
    return fields
