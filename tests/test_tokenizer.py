"""The tokenizer and chat template: unit tests, then the same ids as transformers.

Tiny byte-level BPEs are trained here on mixed English / Chinese / code / emoji text and
written to tmp_path as model folders of three styles: SmolLM2 (ChatML, GPT2Tokenizer), Qwen2.5
(ChatML with tools, Qwen2Tokenizer) and Llama 3.2 (BOS from the post-processor, strftime_now,
raise_exception), each with its real chat template as its tokenizer_config.json holds it.
"""

import json
import unicodedata
from datetime import datetime

import pytest
from tokenizers import Regex, Tokenizer as RustTokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

from tinylora.errors import TinyloraError
from tinylora.tokenizer import Tokenizer

CORPUS = ["Hello world! The quick brown fox jumps over the lazy dog.",
          "LoRA trains two small matrices A and B; the frozen weight W stays as it is.",
          "你好，世界！我是小李，一个由小张开发的人工智能助手。", "今天天气很好，我们去公园散步吧。",
          "def square(x: int) -> int:\n    return x ** 2  # 平方\n", "for (int i = 0; i < n; i++) { sum += a[i]; }",
          "Emoji: 😀 🎉 👍🏽 ❤️ and numbers 12345, 3.14159."] * 10

# Text the tiny tokenizers never saw: rare characters are split into byte tokens, which is
# what makes streaming decode interesting.
UNSEEN = ["Mixed: 龘龍 and 🦙🚀 with code `print(\"你好\")`", "café naïve — “quotes” ‘single’ 🇨🇳 👨‍👩‍👧",
          "  leading spaces\ttabs\nand\r\nnewlines  ", "数字 2024 年 10 月 1 日 — 国庆节 🎆"]
TEXTS = CORPUS[:7] + UNSEEN

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eom_id|>", "<|eot_id|>"]

# HuggingFaceTB/SmolLM2-135M-Instruct's template.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Qwen/Qwen2.5-Instruct's template, exactly as the JSON string in its tokenizer_config.json.
QWEN25_TEMPLATE = json.loads('"' + r'''{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n''' + '"')

# meta-llama/Llama-3.2-Instruct's template (bos_token, strftime_now, raise_exception, tojson(indent=4)).
LLAMA32_TEMPLATE = json.loads('"' + r'''{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n    {%- else %}\n        {%- set date_string = \"26 Jul 2024\" %}\n    {%- endif %}\n{%- endif %}\n{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n{#- This block extracts the system message, so we can slot it into the right place. #}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n\n{#- System message #}\n{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{%- if tools is not none %}\n    {{- \"Environment: ipython\\n\" }}\n{%- endif %}\n{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n{%- if tools is not none and not tools_in_user_message %}\n    {{- \"You have access to the following functions. To call a function, please respond with JSON for a function call.\" }}\n    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- \"\\n\\n\" }}\n    {%- endfor %}\n{%- endif %}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n\n{#- Custom tools are passed in a user message with some extra guidance #}\n{%- if tools_in_user_message and not tools is none %}\n    {#- Extract the first user message so we can plug it in here #}\n    {%- if messages | length != 0 %}\n        {%- set first_user_message = messages[0]['content']|trim %}\n        {%- set messages = messages[1:] %}\n    {%- else %}\n        {{- raise_exception(\"Cannot put tools in the first user message when there's no first user message!\") }}\n{%- endif %}\n    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n    {{- \"Given the following functions, please respond with a JSON for a function call \" }}\n    {{- \"with its proper arguments that best answers the given prompt.\\n\\n\" }}\n    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- \"\\n\\n\" }}\n    {%- endfor %}\n    {{- first_user_message + \"<|eot_id|>\"}}\n{%- endif %}\n\n{%- for message in messages %}\n    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n    {%- elif 'tool_calls' in message %}\n        {%- if not message.tool_calls|length == 1 %}\n            {{- raise_exception(\"This model only supports single tool-calls at once!\") }}\n        {%- endif %}\n        {%- set tool_call = message.tool_calls[0].function %}\n        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n        {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n        {{- '\"parameters\": ' }}\n        {{- tool_call.arguments | tojson }}\n        {{- \"}\" }}\n        {{- \"<|eot_id|>\" }}\n    {%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n        {{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}\n        {%- if message.content is mapping or message.content is iterable %}\n            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n        {%- endif %}\n        {{- \"<|eot_id|>\" }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n''' + '"')

# The pre-tokenizer regexes of Qwen2 and Llama 3: digits one at a time, or up to three together.
SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}DIGITS"""
         r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_SPLIT, LLAMA3_SPLIT = SPLIT.replace("DIGITS", ""), SPLIT.replace("DIGITS", "{1,3}")


def train_bpe(style: str) -> RustTokenizer:
    """A byte-level BPE of ~400 tokens with the pipeline of the given model family."""
    tok = RustTokenizer(models.BPE())
    if style == "smollm2":    # GPT-2's pipeline: the byte-level pre-tokenizer's own regex
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        specials = CHATML_SPECIALS
    else:
        if style == "qwen2":
            tok.normalizer = normalizers.NFC()
        split = pre_tokenizers.Split(Regex(QWEN2_SPLIT if style == "qwen2" else LLAMA3_SPLIT), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                     use_regex=False)])
        specials = CHATML_SPECIALS if style == "qwen2" else LLAMA3_SPECIALS
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if style == "llama3":     # Llama 3 puts <|begin_of_text|> in front of raw text
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
            special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def write_model_folder(folder, style: str, template: str | None = "config", **config_overrides):
    """A model folder's tokenizer files; the chat template goes in tokenizer_config.json ("config"),
    in chat_template.jinja ("jinja") or nowhere (None)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_bpe(style)
    tok.save(str(folder / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in CHATML_SPECIALS + LLAMA3_SPECIALS}
    if style == "smollm2":
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                  "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "add_prefix_space": False,
                  "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "clean_up_tokenization_spaces": False}
        model = {"model_type": "llama", "bos_token_id": ids["<|im_start|>"], "eos_token_id": ids["<|im_end|>"]}
        generation = {"bos_token_id": ids["<|im_start|>"], "eos_token_id": ids["<|im_end|>"]}
        chat_template = SMOLLM2_TEMPLATE
    elif style == "qwen2":
        config = {"tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False, "add_prefix_space": False,
                  "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
                  "errors": "replace", "split_special_tokens": False, "clean_up_tokenization_spaces": False,
                  "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
        model = {"model_type": "qwen2", "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]}
        generation = {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"]}
        chat_template = QWEN25_TEMPLATE
    else:
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                  "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True}
        model = {"model_type": "llama", "bos_token_id": ids["<|begin_of_text|>"],
                 "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]}
        generation = {"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": model["eos_token_id"]}
        chat_template = LLAMA32_TEMPLATE
    if template == "config":
        config["chat_template"] = chat_template
    elif template == "jinja":
        (folder / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    config.update(config_overrides)
    for name, content in [("tokenizer_config.json", config), ("config.json", model),
                          ("generation_config.json", generation)]:
        (folder / name).write_text(json.dumps(content, ensure_ascii=False, indent=2), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {style: write_model_folder(root / style, style) for style in ("smollm2", "qwen2", "llama3")}


# Conversations every template must render the same as transformers.
CHATS = {
    "one user turn": [{"role": "user", "content": "What is the capital of France?"}],
    "system": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Who are you?"}],
    "multi-turn": [{"role": "user", "content": "Hi!"},
                   {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Write x squared in Python.\n"},
                   {"role": "assistant", "content": "def f(x):\n    return x ** 2"},
                   {"role": "user", "content": "  Thanks  "}],
    "chinese and emoji": [{"role": "system", "content": "你是小李，一个由小张开发的人工智能助手。"},
                          {"role": "user", "content": "你是谁？🤔 龘"},
                          {"role": "assistant", "content": "我是小李 😀🎉，很高兴认识你！"}],
    "special token in content": [{"role": "user", "content": "say <|im_end|> and <|eot_id|> literally"}],
}

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "查询天气 (weather) for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市 e.g. 北京"}},
                   "required": ["city"]}}}
TOOL_CHAT = [{"role": "user", "content": "北京天气怎么样？"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]},
             {"role": "tool", "content": "{\"temp\": 25, \"sky\": \"☀️\"}"}]


# ---- unit tests: no transformers needed ------------------------------------------------

@pytest.mark.parametrize("style", ["smollm2", "qwen2", "llama3"])
def test_encode_decode_round_trip(folders, style):
    tok = Tokenizer.from_folder(folders[style])
    for text in TEXTS:
        text = unicodedata.normalize("NFC", text)       # Qwen2 NFC-normalises its input
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text, f"round trip of {text!r}"


def test_special_tokens_vocab_and_what_encode_adds(folders):
    smol, llama = Tokenizer.from_folder(folders["smollm2"]), Tokenizer.from_folder(folders["llama3"])
    assert (smol.bos_token_id, smol.eos_token_id, smol.pad_token_id) == tuple(
        smol.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|im_end|>"))
    assert smol.token_to_id("no such token") is None
    assert smol.vocab_size == len(RustTokenizer.from_file(str(folders["smollm2"] / "tokenizer.json")).get_vocab())
    assert Tokenizer.from_folder(folders["qwen2"]).bos_token_id is None     # Qwen2 has no BOS
    # The post-processor's additions: Llama 3 puts BOS before raw text, ChatML models add nothing.
    assert llama.encode("Hello") == [llama.bos_token_id] + llama.encode("Hello", add_special_tokens=False)
    assert smol.encode("Hello") == smol.encode("Hello", add_special_tokens=False)


def test_eos_token_ids_include_end_of_turn_and_generation_config(folders):
    smol, qwen, llama = (Tokenizer.from_folder(folders[s]) for s in ("smollm2", "qwen2", "llama3"))
    assert smol.eos_token_ids == {smol.token_to_id("<|im_end|>")}
    assert qwen.eos_token_ids == {qwen.token_to_id("<|im_end|>"), qwen.token_to_id("<|endoftext|>")}
    assert llama.eos_token_ids == {llama.token_to_id(t) for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")}


@pytest.mark.parametrize("template", ["config", None])
def test_end_of_turn_token_comes_from_the_template(tmp_path, template):
    # <|im_end|> is not eos_token and no config names it: it stops generation because the template uses it.
    folder = write_model_folder(tmp_path / "m", "smollm2", template=template, eos_token="<|endoftext|>")
    for name in ("generation_config.json", "config.json"):
        (folder / name).unlink()
    tok = Tokenizer.from_folder(folder)
    end_of_turn = {tok.token_to_id("<|im_end|>")} if template else set()
    assert tok.eos_token_ids == {tok.token_to_id("<|endoftext|>")} | end_of_turn


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_stream_decode_never_splits_a_character(folders, skip_special_tokens):
    tok = Tokenizer.from_folder(folders["qwen2"])
    held_back = 0
    for text in UNSEEN + ["<|im_start|>assistant\n我是小李 🦙<|im_end|>"]:
        ids = tok.encode(unicodedata.normalize("NFC", text))
        stream = tok.decode_stream(skip_special_tokens)
        pieces = [stream.step(i) for i in ids]
        assert not any("\ufffd" in p for p in pieces), f"a piece of {text!r} holds half a character: {pieces}"
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip_special_tokens)
        # the oracle: tokenizers' own DecodeStream, the same algorithm in Rust, piece for piece
        oracle = decoders.DecodeStream(skip_special_tokens=skip_special_tokens)
        assert pieces == [oracle.step(tok._backend, i) or "" for i in ids]
        held_back += pieces.count("")
    assert held_back > 0, "no character spanned two tokens: the test text does not exercise streaming"


def test_chatml_template_text(folders):
    tok = Tokenizer.from_folder(folders["smollm2"])
    text = tok.apply_chat_template(CHATS["one user turn"], add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.apply_chat_template(CHATS["one user turn"], add_generation_prompt=True)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert ids.count(tok.token_to_id("<|im_start|>")) == 3


def test_tojson_keeps_chinese_and_llama_date_comes_from_strftime_now(folders):
    qwen = Tokenizer.from_folder(folders["qwen2"])
    text = qwen.apply_chat_template(TOOL_CHAT, tools=[WEATHER_TOOL], tokenize=False)
    assert '"description": "查询天气 (weather) for a city"' in text and '{"city": "北京"}' in text
    llama = Tokenizer.from_folder(folders["llama3"])
    before = datetime.now().strftime("%d %b %Y")
    text = llama.apply_chat_template(CHATS["one user turn"], tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system")
    assert any("Today Date: " + day in text for day in (before, datetime.now().strftime("%d %b %Y")))
    assert "Today Date: 01 Jan 2000" in llama.apply_chat_template(CHATS["one user turn"], tokenize=False,
                                                                  date_string="01 Jan 2000")


def test_template_list_added_token_dicts_and_jinja_file(tmp_path):
    # Older configs: several named templates, special tokens as AddedToken dicts.
    folder = write_model_folder(
        tmp_path / "m", "smollm2", template=None,
        chat_template=[{"name": "default", "template": "{{ bos_token }}D:{{ messages[0]['content'] }}"},
                       {"name": "tool_use", "template": "T:{{ tools | length }}"}],
        bos_token={"__type": "AddedToken", "content": "<|im_start|>", "lstrip": False, "special": True})
    tok, user = Tokenizer.from_folder(folder), [{"role": "user", "content": "x"}]
    assert tok.bos_token_id == tok.token_to_id("<|im_start|>")
    assert tok.apply_chat_template(user, tokenize=False) == "<|im_start|>D:x"
    assert tok.apply_chat_template(user, tools=[WEATHER_TOOL], tokenize=False) == "T:1"
    # Newer folders: chat_template.jinja replaces whatever tokenizer_config.json holds.
    (folder / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}]{% endfor %}")
    tok = Tokenizer.from_folder(folder)
    assert tok.apply_chat_template(CHATS["system"], tools=[WEATHER_TOOL], tokenize=False) == "[system][user]"


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(TinyloraError, match="no such model folder"):
        Tokenizer.from_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TinyloraError, match=r"empty: no tokenizer\.json; a tokenizer\.json .* is needed"):
        Tokenizer.from_folder(tmp_path / "empty")
    folder = write_model_folder(tmp_path / "m", "smollm2")
    (folder / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>",\n  oops}')
    with pytest.raises(TinyloraError, match=r"tokenizer_config\.json: malformed JSON at line 2, column"):
        Tokenizer.from_folder(folder)
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(TinyloraError, match=r"tokenizer\.json: cannot be read"):
        Tokenizer.from_folder(folder)


def test_no_chat_template(tmp_path):
    tok = Tokenizer.from_folder(write_model_folder(tmp_path / "m", "smollm2", template=None))
    assert tok.chat_template is None
    with pytest.raises(TinyloraError, match="has no chat template.*--ignore-chat-template"):
        tok.apply_chat_template(CHATS["one user turn"])


@pytest.mark.parametrize("messages, words", [
    ([], "non-empty list of messages"),
    ("hello", "non-empty list of messages"),
    (["hello"], "message 0: expected a dict"),
    ([{"role": "user", "content": "hi"}, {"content": "no role"}], "message 1: missing field 'role'"),
    ([{"role": "user"}], "message 0: missing field 'content'"),
    ([{"role": "user", "content": None}], "message 0: missing field 'content'"),
    ([{"role": "user", "content": 42}], "message 0: field 'content' must be a string, got int"),
    ([{"role": ["user"], "content": "hi"}], "message 0: field 'role' must be a string, got list"),
])
def test_malformed_messages(folders, messages, words):
    tok = Tokenizer.from_folder(folders["smollm2"])
    with pytest.raises(TinyloraError, match=words):
        tok.apply_chat_template(messages)


def test_template_refusals_become_one_line_errors(folders, tmp_path):
    llama = Tokenizer.from_folder(folders["llama3"])
    two_calls = [{"role": "user", "content": "hi"},
                 {"role": "assistant", "content": "", "tool_calls": TOOL_CHAT[1]["tool_calls"] * 2}]
    with pytest.raises(TinyloraError, match="rejected these messages: This model only supports single tool-calls"):
        llama.apply_chat_template(two_calls)
    broken = Tokenizer.from_folder(write_model_folder(tmp_path / "m", "smollm2", chat_template="{% for %}"))
    with pytest.raises(TinyloraError, match="syntax error"):
        broken.apply_chat_template(CHATS["one user turn"])


# ---- reference tests: the same ids and text as transformers ----------------------------

@pytest.fixture(scope="module")
def hf_auto():
    transformers = pytest.importorskip("transformers", reason="reference extra not installed")
    return transformers.AutoTokenizer.from_pretrained


def assert_same_ids(ours, theirs, what):
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    assert ours == theirs, f"{what}: first difference at position {at}\n ours:   {ours}\n theirs: {theirs}"


@pytest.mark.parametrize("style", ["smollm2", "qwen2", "llama3"])
def test_encode_decode_match_transformers(folders, hf_auto, style):
    ours, theirs = Tokenizer.from_folder(folders[style]), hf_auto(folders[style])
    assert ours.vocab_size == len(theirs)
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>", "<|begin_of_text|>x<|eot_id|>"]:
        assert_same_ids(ours.encode(text), theirs(text)["input_ids"], f"tok({text!r})")
        assert_same_ids(ours.encode(text), theirs.encode(text), f"tok.encode({text!r})")
        ids = ours.encode(text, add_special_tokens=False)
        assert_same_ids(ids, theirs.encode(text, add_special_tokens=False), f"encode({text!r}) without specials")
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("chat", list(CHATS))
@pytest.mark.parametrize("style", ["smollm2", "qwen2", "llama3"])
def test_chat_template_matches_transformers(folders, hf_auto, style, chat, add_generation_prompt):
    ours, theirs = Tokenizer.from_folder(folders[style]), hf_auto(folders[style])
    messages = CHATS[chat]
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert text == theirs.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert_same_ids(ids, theirs.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                    return_dict=False), f"{style} / {chat}")
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("style", ["qwen2", "llama3"])
def test_tool_templates_match_transformers(folders, hf_auto, style):
    ours, theirs = Tokenizer.from_folder(folders[style]), hf_auto(folders[style])
    messages = TOOL_CHAT[:1] if style == "llama3" else TOOL_CHAT    # Llama's template wants tool_calls[0].function
    for kwargs in ({"tools": [WEATHER_TOOL]}, {"tools": [WEATHER_TOOL], "add_generation_prompt": True},
                   {"tools": [WEATHER_TOOL], "tools_in_user_message": False}):
        assert_same_ids(ours.apply_chat_template(messages, **kwargs),
                        theirs.apply_chat_template(messages, return_dict=False, **kwargs), f"{style} {kwargs}")


@pytest.mark.parametrize("chat", ["system", "chinese and emoji"])
def test_chat_template_jinja_file_matches_transformers(tmp_path, hf_auto, chat):
    folder = write_model_folder(tmp_path / "m", "qwen2", template="jinja")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**json.loads((folder / "tokenizer_config.json").read_text()), "chat_template": "{{ 'stale' }}"}))
    ours, theirs = Tokenizer.from_folder(folder), hf_auto(folder)
    assert ours.chat_template == QWEN25_TEMPLATE
    for gen in (False, True):
        assert_same_ids(ours.apply_chat_template(CHATS[chat], add_generation_prompt=gen),
                        theirs.apply_chat_template(CHATS[chat], add_generation_prompt=gen, return_dict=False), chat)


# Whitespace control (trim_blocks, lstrip_blocks), loop controls and the generation tag: the
# real templates above write `{%-` everywhere and would render the same without them.
FEATURES_TEMPLATE = """{% for message in messages %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
    {% if loop.index > 4 %}{% break %}{% endif %}
    {% generation %}
[{{ message['role'] | upper }}] {{ message['content'] | trim }}
    {% endgeneration %}
{% endfor %}
{% if add_generation_prompt %}[ASSISTANT]{% endif %}"""


def test_whitespace_loop_controls_and_generation_tag(tmp_path):
    folder = write_model_folder(tmp_path / "m", "smollm2", template=None, chat_template=FEATURES_TEMPLATE)
    ours = Tokenizer.from_folder(folder)
    text = ours.apply_chat_template(CHATS["multi-turn"], add_generation_prompt=True, tokenize=False)
    assert text == ("[USER] Hi!\n[ASSISTANT] Hello! How can I help?\n[USER] Write x squared in Python.\n"
                    "[ASSISTANT] def f(x):\n    return x ** 2\n[ASSISTANT]")
    theirs = pytest.importorskip("transformers", reason="reference extra not installed").AutoTokenizer
    for chat in ("multi-turn", "system"):
        assert_same_ids(ours.apply_chat_template(CHATS[chat]),
                        theirs.from_pretrained(folder).apply_chat_template(CHATS[chat], return_dict=False), chat)


# ---- the real SmolLM2 (both sides read our tokenizer.json; the GGUF build is test_smollm2.py's job)
@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_dir, hf_auto):
    ours, theirs = Tokenizer.from_folder(smollm2_dir), hf_auto(smollm2_dir)
    assert ours.eos_token_id == theirs.eos_token_id
    assert ours.token_to_id("<|im_end|>") in ours.eos_token_ids
    for text in TEXTS + ["Who are you? I am 小李, an AI assistant developed by 小张.",
                         "x = [i ** 2 for i in range(10)]  # 0..81 ✓\n\tprint(f\"{x!r}\")"]:
        ids = ours.encode(text)
        assert_same_ids(ids, theirs(text)["input_ids"], f"tok({text!r})")
        assert ours.decode(ids) == theirs.decode(ids)
    for chat, messages in CHATS.items():
        for gen in (False, True):
            assert_same_ids(ours.apply_chat_template(messages, add_generation_prompt=gen),
                            theirs.apply_chat_template(messages, add_generation_prompt=gen, return_dict=False),
                            f"SmolLM2 / {chat}")
