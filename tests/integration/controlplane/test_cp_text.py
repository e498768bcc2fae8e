"""Text and chat prompts through the control plane with the served model's own tokenizer:
counted and classified in its tokens, output streamed back as its text (also on resume)."""

from __future__ import annotations

import asyncio
import json
import sys
from asyncio.subprocess import PIPE

import pytest
from cp_harness import GENERAL, make_config, migrated_db, start_control_plane
from cp_sim_agent import SimAgent, expected_token
from tokenizer_dir import write_chat_tokenizer
from transformers import AutoTokenizer

from controlplane.text.hf import HFCodec
from sdk.aio import AsyncClient
from sdk.errors import InvalidArgumentError
from sdk.types import ChatMessage, RequestClass, RequestState

pytestmark = pytest.mark.timeout(60)


async def test_text_and_chat_prompts_use_the_model_tokenizer(tmp_path):
    # Prepare: a control plane given the model directory's tokenizer; short = under 64 tokens
    model_dir = write_chat_tokenizer(tmp_path / "model")
    reference = AutoTokenizer.from_pretrained(model_dir)
    config = make_config(migrated_db(tmp_path), tokenizer=str(model_dir))
    cp = await start_control_plane(config)
    agent = SimAgent(cp.target, "node-a", [("a0", GENERAL, 4096)])
    await agent.start()
    client = AsyncClient(cp.target, timeout_s=10)
    text = "The quick brown fox jumps over the lazy dog. " * 2  # 90 bytes, fewer tokens
    chat = [ChatMessage("system", "Be brief."), ChatMessage("user", "héllo wörld 🙂")]
    try:
        # Execute
        by_text = await client.submit(text, max_new_tokens=6)
        long_text = await client.submit(text * 2, max_new_tokens=1)
        by_chat = await client.submit(chat, max_new_tokens=12)
        result = await client.result(by_chat.request_id)
        chunks = [c async for c in client.generate(by_chat.request_id, from_token_index=5)]
        with pytest.raises(InvalidArgumentError) as refused:
            await client.submit([ChatMessage("assistant", "I go first")], max_new_tokens=2)
        # Assert: prompts counted in the model's tokens, classes from those counts
        text_ids = reference.encode(text)
        chat_ids = reference.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in chat],
            add_generation_prompt=True,
            return_dict=False,
        )
        assert by_text.prompt_tokens == len(text_ids) < 64 <= len(text.encode())
        assert by_text.request_class is RequestClass.SHORT
        assert long_text.prompt_tokens == len(reference.encode(text * 2)) >= 64
        assert long_text.request_class is RequestClass.LONG
        assert by_chat.prompt_tokens == len(chat_ids)
        # ... and the output decoded by it, whole and after a resume at token 5
        expected = [expected_token(list(chat_ids), i) for i in range(12)]
        assert result.state is RequestState.FINISHED and list(result.token_ids) == expected
        assert result.text == reference.decode(expected, skip_special_tokens=True)
        # (the simulated agent's tokens are not valid UTF-8 text, so the resumed text is checked
        # against a decoder positioned after the first 5 tokens, not against a slice of the text)
        resumed = "".join(c.text for c in chunks)
        assert [t for c in chunks for t in c.token_ids] == expected[5:]
        assert resumed == HFCodec.from_directory(model_dir).stream_decoder(expected[:5]).feed(
            expected[5:]
        )
        assert refused.value.field == "prompt.chat" and "alternate" in refused.value.message
    finally:
        await client.close()
        await agent.stop()
        await cp.stop()


async def test_cli_submits_text_as_chat_and_prints_the_model_text(tmp_path):
    # Prepare
    model_dir = write_chat_tokenizer(tmp_path / "model")
    reference = AutoTokenizer.from_pretrained(model_dir)
    cp = await start_control_plane(make_config(migrated_db(tmp_path), tokenizer=str(model_dir)))
    agent = SimAgent(cp.target, "node-a", [("a0", GENERAL, 4096)])
    await agent.start()
    try:
        # Execute: the CLI in a subprocess (this event loop keeps serving meanwhile)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pecsched", "submit", "héllo", "--chat", "--max-tokens", "6",
            "--target", cp.target, "--json", stdout=PIPE, stderr=PIPE,
        )  # fmt: skip
        stdout, stderr = await process.communicate()
        # Assert
        assert process.returncode == 0, stderr.decode()
        printed = json.loads(stdout)
        chat_ids = reference.apply_chat_template(
            [{"role": "user", "content": "héllo"}], add_generation_prompt=True, return_dict=False
        )
        expected = [expected_token(list(chat_ids), i) for i in range(6)]
        assert printed["token_ids"] == expected
        assert printed["text"] == reference.decode(expected, skip_special_tokens=True)
    finally:
        await agent.stop()
        await cp.stop()


async def test_chat_prompts_need_a_chat_template(tmp_path):
    # Prepare: a model tokenizer saved without a chat template
    model_dir = write_chat_tokenizer(tmp_path / "model", chat_template=None)
    cp = await start_control_plane(make_config(migrated_db(tmp_path), tokenizer=str(model_dir)))
    client = AsyncClient(cp.target, timeout_s=10)
    try:
        # Execute
        with pytest.raises(InvalidArgumentError) as refused:
            await client.submit([ChatMessage("user", "hi")], max_new_tokens=2)
        # Assert
        assert refused.value.detail_code == "CHAT_UNSUPPORTED"
        assert refused.value.field == "prompt.chat"
    finally:
        await client.close()
        await cp.stop()


async def test_byte_models_take_chat_as_plain_role_lines(tmp_path):
    # Prepare: the default byte tokenizer (a preset model without a tokenizer of its own)
    cp = await start_control_plane(make_config(migrated_db(tmp_path)))
    client = AsyncClient(cp.target, timeout_s=10)
    try:
        # Execute
        ack = await client.submit([ChatMessage("user", "héllo")], max_new_tokens=2)
        # Assert: one token per byte of the plain rendering
        assert ack.prompt_tokens == len("user: héllo\nassistant:".encode())
    finally:
        await client.close()
        await cp.stop()
