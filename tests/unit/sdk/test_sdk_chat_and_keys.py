"""The asyncio client's chat prompts and per-caller API keys, against the scripted fake server."""

from __future__ import annotations

import pytest
from sdk_fake_control_plane import FakeControlPlane

from sdk.aio import AsyncClient
from sdk.types import ChatMessage


async def test_chat_messages_travel_as_the_chat_prompt(fake: FakeControlPlane, target: str) -> None:
    # Prepare
    chat = [ChatMessage("system", "Be brief."), ChatMessage("user", "héllo")]
    async with AsyncClient(target) as client:
        # Execute
        await client.submit(chat, max_new_tokens=2)
        with pytest.raises(ValueError, match=r"prompt\[1\] must be a ChatMessage"):
            await client.submit([chat[0], 5], max_new_tokens=2)  # type: ignore[list-item]
    # Assert
    (call,) = fake.calls_of("Submit")
    assert call.request.WhichOneof("prompt") == "chat"
    assert [(m.role, m.content) for m in call.request.chat.messages] == [
        ("system", "Be brief."),
        ("user", "héllo"),
    ]


async def test_with_api_key_sends_that_key_over_the_same_channel(
    fake: FakeControlPlane, target: str
) -> None:
    # Prepare
    owner = AsyncClient(target, api_key="gateway")
    caller = owner.with_api_key("caller-key")
    anonymous = owner.with_api_key(None)
    # Execute
    await caller.submit([1, 2], max_new_tokens=2)
    await caller.close()  # a derived client leaves the shared channel open
    await anonymous.submit([3], max_new_tokens=2)
    await owner.submit([4], max_new_tokens=2)
    await owner.close()
    # Assert
    keys = [c.metadata.get("authorization") for c in fake.calls_of("Submit")]
    assert keys == ["Bearer caller-key", None, "Bearer gateway"]
