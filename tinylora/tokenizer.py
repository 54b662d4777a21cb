"""Text to token ids and back: a `tokenizers.Tokenizer` plus the model's own chat template.

Here:
- `Tokenizer.from_folder(path)` reads a Hugging Face model folder: `tokenizer.json` (the whole
  pipeline: normaliser, pre-tokeniser, BPE, post-processor, decoder), `tokenizer_config.json`
  (special tokens, the chat template), `chat_template.jinja` (where transformers >= 4.47 writes
  the template instead; it wins when present, as in transformers) and `generation_config.json` /
  `config.json` (extra end-of-sequence ids).
- `encode`, `decode`, `apply_chat_template`, the special-token ids, `eos_token_ids` (every id
  that should stop generation), and `StreamDecoder`, which turns ids into text one id at a time
  without ever cutting a multi-byte UTF-8 character in half.
- `render_chat_template`: the Jinja rendering exactly as transformers 5 does it
  (`utils/chat_template_utils.py`): a sandbox with `trim_blocks` and `lstrip_blocks`, the
  `loopcontrols` extension, a `tojson` filter that keeps non-ASCII text as is, and the globals
  `raise_exception` and `strftime_now`. The special tokens (`bos_token`, `eos_token`, ...) are
  template variables. The rendered text is then encoded *without* adding special tokens, since
  the template already wrote every one it wants.

Not here: training a tokenizer, the slow (pure Python) tokenizers, tokenizers that are not in
`tokenizer.json` form (a GGUF vocabulary is converted by `formats`), transformers' batching,
padding and truncation (`data.py` batches), the assistant-token mask, `continue_final_message`,
and `sanitize_control_tokens` (off by default in transformers too). Special tokens named in
`tokenizer_config.json` but missing from the vocabulary are not added (transformers would
append them as new ids, which a pretrained model's embedding has no row for).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import TinyloraError
from .formats.files import read_json

# Tokens that end a chat turn. Generation stops on them as well as on EOS, but only for a model
# whose chat template writes one and whose vocabulary has it as a special token.
END_OF_TURN_TOKENS = ("<|im_end|>",     # ChatML: Qwen2, SmolLM2
                      "<|eot_id|>",     # Llama 3: end of turn
                      "<|eom_id|>",     # Llama 3.1: end of a message that calls a tool
                      "<|end|>",        # Phi-3
                      "<end_of_turn>")  # Gemma


# ---- the chat template, rendered as transformers renders it ------------------------------

class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers uses the tag to find assistant
    text for its assistant-token mask. We only need the text, so the body renders unchanged;
    without this extension such templates would not even parse."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    # Templates call this to refuse a conversation ("roles must alternate user/assistant").
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON, and
    # transformers' version keeps Chinese and emoji as they are (ensure_ascii=False).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    # Llama 3.x templates write today's date into the system prompt.
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in transformers' environment (cached: templates are long).

    transformers also swaps in hardened `dict` and `namespace` globals against sandbox escapes;
    they render the same for every template we know, so we keep Jinja's own.
    """
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_chat_template(source: str, messages: list[dict], special_tokens: dict[str, str],
                         add_generation_prompt: bool = False, tools: list[dict] | None = None,
                         documents: list[dict] | None = None, **template_kwargs) -> str:
    """Render `messages` with a chat template, passing what transformers passes.

    Variables: messages, tools and documents (None when not given: a template can tell
    `tools is none` from `tools is defined`), add_generation_prompt, every special token, and
    any extra keyword (e.g. `enable_thinking`, `date_string`), which overrides a special token
    of the same name.
    """
    variables = {**special_tokens, **template_kwargs}
    return compile_chat_template(source).render(messages=messages, tools=tools, documents=documents,
                                                add_generation_prompt=add_generation_prompt, **variables)


def _check_messages(messages) -> list[dict]:
    """Return the messages with None-valued keys dropped (as transformers does: APIs send
    `content=None`); raise TinyloraError naming the first bad message and field."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TinyloraError("apply_chat_template needs a non-empty list of messages "
                            '({"role": ..., "content": ...} dicts)')
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TinyloraError(f"message {i}: expected a dict with 'role' and 'content', "
                                f"got {type(message).__name__}")
        message = {key: value for key, value in message.items() if value is not None}
        for field in ("role", "content"):
            if field not in message:
                raise TinyloraError(f"message {i}: missing field '{field}'")
            if not isinstance(message[field], str):
                raise TinyloraError(f"message {i}: field '{field}' must be a string, "
                                    f"got {type(message[field]).__name__}")
        checked.append(message)
    return checked


# ---- streaming decode --------------------------------------------------------------------

class StreamDecoder:
    """Feed token ids one at a time; `step` returns only the text they newly complete.

    Decoding each id on its own is wrong twice over: a Chinese character or an emoji is often
    spread over 2-4 byte-level tokens (each alone decodes to U+FFFD, the replacement
    character), and some decoders treat the first token of a string specially (SentencePiece
    drops its leading space). So we decode a window that starts one token before the unread
    ones, subtract the text of the already-read part, and hold back output while the window
    still ends in U+FFFD. This is the algorithm of `tokenizers.decoders.DecodeStream`, written
    out here to be read (the tests check the two agree).
    """

    def __init__(self, backend: tokenizers.Tokenizer, skip_special_tokens: bool = False):
        self._backend = backend
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0   # window start: the last token already turned into text
        self._read = 0     # first token not yet turned into text

    def step(self, token_id: int) -> str:
        """Add one id; return the newly completed text ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        before = self._backend.decode(self._ids[self._prefix:self._read], skip_special_tokens=self._skip)
        window = self._backend.decode(self._ids[self._prefix:], skip_special_tokens=self._skip)
        if len(window) > len(before) and not window.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return window[len(before):]
        return ""


# ---- the tokenizer -----------------------------------------------------------------------

def _token_text(value) -> str | None:
    # tokenizer_config.json writes a special token as "<s>", as null, or as an AddedToken
    # dict {"__type": "AddedToken", "content": "<s>", "lstrip": false, ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value) -> list[int]:
    # eos_token_id in config.json / generation_config.json: absent, an int, or a list of ints.
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


class Tokenizer:
    """A model's tokenizer and chat template. Build one with `Tokenizer.from_folder(path)`."""

    def __init__(self, backend: tokenizers.Tokenizer, special_tokens: dict[str, str] | None = None,
                 chat_templates: dict[str, str] | None = None, extra_eos_ids=(), source: str = ""):
        self._backend = backend
        # transformers encodes with padding and truncation switched off unless asked for;
        # a tokenizer.json may have them switched on.
        self._backend.no_padding()
        self._backend.no_truncation()
        self.special_tokens = dict(special_tokens or {})   # {"bos_token": "<s>", ...}: template variables
        self._templates = dict(chat_templates or {})       # {"default": ..., "tool_use": ...}
        self.source = source                               # where the files came from, for messages
        self.bos_token_id = self._special_id("bos_token")
        self.eos_token_id = self._special_id("eos_token")
        self.pad_token_id = self._special_id("pad_token")
        eos = set(extra_eos_ids) | ({self.eos_token_id} if self.eos_token_id is not None else set())
        special = {token.content: i for i, token in backend.get_added_tokens_decoder().items() if token.special}
        templates = "".join(self._templates.values())
        eos |= {special[t] for t in END_OF_TURN_TOKENS if t in special and t in templates}
        self.eos_token_ids: frozenset[int] = frozenset(eos)

    @classmethod
    def from_folder(cls, path) -> Tokenizer:
        """Read tokenizer.json, tokenizer_config.json, chat_template.jinja and the eos ids."""
        folder = Path(path)
        if not folder.is_dir():
            raise TinyloraError(f"{folder}: no such model folder")
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TinyloraError(f"{folder}: no tokenizer.json; a tokenizer.json (Hugging Face `tokenizers` "
                                f"format) is needed to tokenize text for this model")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust side raises plain Exception with serde's message
            raise TinyloraError(f"{tokenizer_file}: cannot be read by `tokenizers`: {e}") from None

        config_file = folder / "tokenizer_config.json"
        config = read_json(config_file) if config_file.is_file() else {}
        extra_eos = []
        for name in ("generation_config.json", "config.json"):
            if (folder / name).is_file():
                extra_eos += _as_id_list(read_json(folder / name).get("eos_token_id"))
        return cls.from_parts(backend, config, cls._read_chat_templates(folder, config), extra_eos, str(folder))

    @classmethod
    def from_parts(cls, backend: tokenizers.Tokenizer, config: dict, templates: dict[str, str],
                   extra_eos: list[int], source: str) -> Tokenizer:
        """What a folder's files hold, already read: the backend, tokenizer_config.json's dict, the chat
        templates by name and the eos ids of the model's configs (a GGUF file builds them in memory)."""
        # Every *_token entry is a template variable, as in transformers' special_tokens_map
        # (which also picks up model-specific ones such as `image_token`).
        special_tokens = {key: _token_text(value) for key, value in config.items() if key.endswith("_token")}
        if isinstance(config.get("extra_special_tokens"), dict):
            special_tokens.update({key: _token_text(value) for key, value in config["extra_special_tokens"].items()})
        special_tokens = {key: value for key, value in special_tokens.items() if value is not None}
        if config.get("split_special_tokens"):   # encode "<|im_end|>" in text as plain characters
            backend.encode_special_tokens = True

        return cls(backend, special_tokens, templates, extra_eos, source=source)

    @staticmethod
    def config_templates(config: dict) -> dict[str, str]:
        """tokenizer_config.json's chat templates by name: one as a string, or several as [{"name", "template"}]."""
        entry = config.get("chat_template")
        if isinstance(entry, str):
            return {"default": entry}
        if isinstance(entry, list):
            return {t["name"]: t["template"] for t in entry if isinstance(t, dict) and "name" in t}
        return {}

    @classmethod
    def _read_chat_templates(cls, folder: Path, config: dict) -> dict[str, str]:
        templates = cls.config_templates(config)
        # Newer transformers saves chat_template.jinja (plus additional_chat_templates/*.jinja).
        # When any template file exists, the files replace the config's templates entirely.
        files = {}
        if (folder / "chat_template.jinja").is_file():
            files["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        for extra in sorted((folder / "additional_chat_templates").glob("*.jinja")):
            files[extra.stem] = extra.read_text(encoding="utf-8")
        return files or templates

    # ---- vocabulary ----

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The `tokenizers` object underneath (for writing it out, as a GGUF file's tokenizer does)."""
        return self._backend

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary entry (byte-level BPE writes a leading space as 'Ġ'), or None."""
        return self._backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce, added tokens included: transformers' `len(tok)`.
        (transformers' own `tok.vocab_size` leaves the added tokens out.)"""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        """The default chat template's Jinja source, or None if the model has none."""
        return self._templates.get("default")

    # ---- text <-> ids ----

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids, the same as transformers' `tok(text)["input_ids"]` and `tok.encode(text)`.

        Both default to add_special_tokens=True, so we do too: tokenizer.json's post-processor
        then adds what the model expects around raw text (Llama 3 prepends <|begin_of_text|>;
        Qwen2 and SmolLM2 add nothing). Chat text already holds its special tokens: see
        `apply_chat_template`, which encodes with add_special_tokens=False.
        """
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Ids -> text, as transformers' `tok.decode`. (transformers 5 never applies
        `clean_up_tokenization_spaces` to a BPE tokenizer, and Qwen2/Llama tokenizers are BPE.)"""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A fresh incremental decoder for one generated sequence: `text += d.step(id)`."""
        return StreamDecoder(self._backend, skip_special_tokens)

    # ---- chat ----

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True, tools: list[dict] | None = None,
                            documents: list[dict] | None = None, **template_kwargs) -> list[int] | str:
        """Render a conversation with the model's template; return its ids (or the text).

        `messages`: [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...].
        `add_generation_prompt=True` appends the assistant header, ready for generation.
        Gives exactly the ids of transformers' `tok.apply_chat_template(messages, ...)`.
        """
        messages = _check_messages(messages)
        if tools is not None and not all(isinstance(t, dict) for t in tools):
            raise TinyloraError("tools must be JSON-schema dicts")
        source = self._pick_template(tools)
        try:
            text = render_chat_template(source, messages, self.special_tokens, add_generation_prompt,
                                        tools=tools, documents=documents, **template_kwargs)
        except jinja2.TemplateSyntaxError as e:
            raise TinyloraError(f"{self.source}: the chat template has a syntax error "
                                f"(template line {e.lineno}): {e.message}") from None
        except jinja2.TemplateError as e:     # raise_exception(...), or the template hit a missing field
            raise TinyloraError(f"the chat template of {self.source} rejected these messages: {e}") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _pick_template(self, tools) -> str:
        # As transformers' get_chat_template: "tool_use" when tools are given and it exists,
        # else "default".
        if not self._templates:
            raise TinyloraError(f"this model has no chat template (no chat_template in tokenizer_config.json "
                                f"and no chat_template.jinja in {self.source}); pass --ignore-chat-template "
                                f"to use the prompt as plain text")
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        raise TinyloraError(f"{self.source}: several chat templates ({', '.join(sorted(self._templates))}) "
                            f"and none named 'default'")
