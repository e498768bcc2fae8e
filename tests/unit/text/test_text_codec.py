"""The control plane's text codec against `transformers` on the same model directory.

The directory holds a byte-level BPE trained offline (tests/tokenizer_dir.py) with a chat
template; `transformers.AutoTokenizer` on that directory is the reference for token ids, chat
rendering and decoding.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import jinja2
import pytest
from tokenizer_dir import write_chat_tokenizer
from transformers import AutoTokenizer

from controlplane.config import Config, TextTokenizer
from controlplane.text.chat import ChatTemplateError, ChatTurn, ChatUnsupportedError
from controlplane.text.codec import ByteCodec, load_text_codec
from controlplane.text.hf import TEMPLATE_FILE, HFCodec

TEXTS = ["Hello world", "  the lazy dog\n\n", "héllo wörld ✓", "日本語 🙂 mixed", "</s> literal"]
CHATS = [
    [ChatTurn("user", "Hello there!")],
    [ChatTurn("system", "Be brief."), ChatTurn("user", "  Schedule me first  ")],
    [
        ChatTurn("user", "héllo"),
        ChatTurn("assistant", "wörld 🙂"),
        ChatTurn("user", "and again"),
    ],
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chat_tokenizer(tmp_path_factory.mktemp("model"))


def _messages(turns: list[ChatTurn]) -> list[dict[str, str]]:
    return [{"role": t.role, "content": t.content} for t in turns]


@pytest.mark.parametrize("text", TEXTS)
def test_text_prompts_encode_and_stream_back_as_transformers_does(model_dir, text):
    # Prepare
    reference = AutoTokenizer.from_pretrained(model_dir)
    codec = HFCodec.from_directory(model_dir)
    # Execute: encode, then decode one token at a time as a stream would
    ids = codec.encode(text)
    decoder = codec.stream_decoder([])
    streamed = "".join(decoder.feed([t]) for t in ids)
    # Assert
    assert ids == reference.encode(text)
    assert streamed == reference.decode(ids, skip_special_tokens=True)


def test_streamed_text_is_whole_across_characters_split_over_tokens(model_dir):
    # Prepare: a text whose characters span several byte-level tokens
    codec = HFCodec.from_directory(model_dir)
    reference = AutoTokenizer.from_pretrained(model_dir)
    text = "日本語 🙂 wörld"
    ids = codec.encode(text)
    partial = [reference.decode(ids[:n]) for n in range(1, len(ids))]
    assert any("\ufffd" in p for p in partial), "no token boundary inside a character"
    for split in range(len(ids) + 1):
        # Execute: stream the first part, then resume after it (as Generate does)
        head = codec.stream_decoder([]).feed(ids[:split])
        tail = codec.stream_decoder(ids[:split]).feed(ids[split:])
        # Assert: nothing is lost, repeated or half-decoded
        assert "\ufffd" not in head + tail
        assert head + tail == text


@pytest.mark.parametrize("turns", CHATS)
def test_chat_prompts_match_apply_chat_template(model_dir, turns):
    # Prepare
    reference = AutoTokenizer.from_pretrained(model_dir)
    codec = HFCodec.from_directory(model_dir)
    # Execute
    ids = codec.encode_chat(turns)
    # Assert
    expected = reference.apply_chat_template(
        _messages(turns), add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ids == list(expected)
    rendered = reference.apply_chat_template(
        _messages(turns), add_generation_prompt=True, tokenize=False
    )
    assert reference.decode(ids) == rendered and rendered.endswith("</s>\n<|assistant|>\n")


def test_template_from_tokenizer_config_is_used_like_transformers(tmp_path):
    # Prepare: the older layout, the template inside tokenizer_config.json as a named list
    model_dir = write_chat_tokenizer(tmp_path)
    source = (model_dir / TEMPLATE_FILE).read_text()
    (model_dir / TEMPLATE_FILE).unlink()
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [
        {"name": "default", "template": source.replace("You are", "Thou art")},
        {"name": "tool_use", "template": "unused"},
    ]
    config["bos_token"] = {"content": "<s>", "special": True, "__type": "AddedToken"}
    config_path.write_text(json.dumps(config))
    turns = CHATS[0]
    # Execute
    ids = HFCodec.from_directory(model_dir).encode_chat(turns)
    # Assert
    reference = AutoTokenizer.from_pretrained(model_dir)
    expected = reference.apply_chat_template(
        _messages(turns), add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ids == list(expected)
    assert "Thou art" in reference.decode(ids)


def test_template_refusals_are_chat_template_errors(model_dir):
    # Prepare: two user turns in a row, which the template refuses with raise_exception
    turns = [ChatTurn("user", "a"), ChatTurn("user", "b")]
    codec = HFCodec.from_directory(model_dir)
    # Execute / Assert: the same refusal as transformers'
    with pytest.raises(ChatTemplateError, match="must alternate"):
        codec.encode_chat(turns)
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        AutoTokenizer.from_pretrained(model_dir).apply_chat_template(_messages(turns))
    with pytest.raises(ChatTemplateError, match="at least one message"):
        codec.encode_chat([])


def test_chat_needs_a_template_and_text_needs_a_tokenizer_file(tmp_path):
    # Prepare
    no_template = write_chat_tokenizer(tmp_path / "plain", chat_template=None)
    # Execute / Assert
    with pytest.raises(ChatUnsupportedError, match="no chat template"):
        HFCodec.from_directory(no_template).encode_chat(CHATS[0])
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        HFCodec.from_directory(tmp_path)


def test_byte_models_chat_in_plain_role_lines():
    ids = ByteCodec().encode_chat(CHATS[1])
    assert bytes(ids).decode() == "system: Be brief.\nuser:   Schedule me first  \nassistant:"


def test_config_picks_the_model_tokenizer_over_the_byte_rule(model_dir):
    # Prepare
    byte = Config()
    none = replace(byte, text_tokenizer=TextTokenizer.NONE)
    model = replace(none, tokenizer=str(model_dir))
    # Execute
    codecs = [load_text_codec(c) for c in (byte, none, model)]
    # Assert
    assert isinstance(codecs[0], ByteCodec) and codecs[1] is None
    assert isinstance(codecs[2], HFCodec) and codecs[2].name == str(model_dir)
