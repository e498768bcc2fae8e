"""The decoder against transformers on the same weights; presets, loading, tokenizers.

Tolerances: float32 on CPU; our forward differs from transformers' only in summation order,
so logits agree to rtol = atol = 1e-4 (logit magnitudes are ~1-10).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CPU, Oracle

from dataplane.models.attention import dense_causal_attend
from dataplane.models.llama import ModelShape
from dataplane.models.loading import (
    export_hf_directory,
    load_hf_directory,
    parse_dtype,
    random_model,
    resolve_model,
)
from dataplane.models.presets import PRESET_NAMES, preset_config
from dataplane.models.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

TOL = {"rtol": 1e-4, "atol": 1e-4}


def test_forward_logits_equal_transformers(oracle: Oracle) -> None:
    # Prepare
    prompt = oracle.prompt(1, 48)

    # Execute
    with torch.inference_mode():
        ours = oracle.model(torch.tensor(prompt), torch.arange(48), dense_causal_attend)
        theirs = oracle.hf_model(torch.tensor([prompt])).logits[0]

    # Assert
    torch.testing.assert_close(ours, theirs, **TOL)


def test_seeded_random_model_says_something(oracle: Oracle) -> None:
    # Execute
    tokens = oracle.greedy(oracle.prompt(2, 16), 24)

    # Assert
    oracle.assert_varied(tokens)


def test_same_seed_same_weights_and_different_seed_different() -> None:
    # Prepare
    config = preset_config("tiny")

    # Execute
    a = random_model(config, seed=3, dtype=torch.float32, device=CPU)
    b = random_model(config, seed=3, dtype=torch.float32, device=CPU)
    c = random_model(config, seed=4, dtype=torch.float32, device=CPU)

    # Assert
    for (name, pa), pb, pc in zip(
        a.named_parameters(), b.parameters(), c.parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, pc), name


def test_loading_a_sharded_directory_written_by_transformers(
    oracle: Oracle, tmp_path: Path
) -> None:
    # Prepare: transformers itself writes the directory, in several safetensors shards.
    oracle.hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    prompt = torch.tensor(oracle.prompt(3, 32))

    # Execute
    loaded = load_hf_directory(tmp_path, dtype=torch.float32, device=CPU)
    with torch.inference_mode():
        ours = loaded(prompt, torch.arange(32), dense_causal_attend)
        theirs = oracle.hf_model(prompt[None]).logits[0]

    # Assert
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == (
        oracle.preset == "tiny-qwen2"
    )
    torch.testing.assert_close(ours, theirs, **TOL)


def test_loading_in_bfloat16_casts_every_weight(oracle: Oracle) -> None:
    # Execute
    model = resolve_model(str(oracle.directory), seed=0, dtype=torch.bfloat16, device=CPU)

    # Assert
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    want = dict(oracle.model.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.float(), want[name].bfloat16().float(), rtol=0, atol=0)


def test_directory_without_weights_is_refused(tmp_path: Path) -> None:
    # Prepare
    preset_config("tiny").save_pretrained(tmp_path)

    # Execute / Assert
    with pytest.raises((ValueError, FileNotFoundError, OSError)):
        load_hf_directory(tmp_path, dtype=torch.float32, device=CPU)


def test_unknown_model_preset_and_dtype_name_the_choices() -> None:
    with pytest.raises(ValueError, match="tiny"):
        resolve_model("no-such-model", seed=0, dtype=torch.float32, device=CPU)
    with pytest.raises(ValueError, match="bfloat16"):
        parse_dtype("float8")
    assert parse_dtype("bf16") is torch.bfloat16


def test_unsupported_rope_scaling_is_refused() -> None:
    # Prepare
    config = preset_config("tiny")
    config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}

    # Execute / Assert
    with pytest.raises(ValueError, match="yarn"):
        random_model(config, seed=0, dtype=torch.float32, device=CPU)


@pytest.mark.parametrize(
    ("preset", "billions"),
    [
        ("llama-3.2-1b", 1.24),
        ("llama-3-8b", 8.03),
        ("mistral-7b", 7.25),
        ("qwen2-7b", 7.62),
        ("llama-3.1-70b", 70.55),
    ],
)
def test_preset_shapes_have_the_published_parameter_counts(preset: str, billions: float) -> None:
    # Execute
    shape = ModelShape.from_config(preset_config(preset))

    # Assert
    assert shape.num_params() / 1e9 == pytest.approx(billions, rel=0.01)
    assert preset in PRESET_NAMES


def test_byte_tokenizer_round_trips_and_hf_tokenizer_is_used_when_present(tmp_path: Path) -> None:
    # Prepare
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path)

    # Execute
    byte_tok = load_tokenizer("tiny")
    hf_tok = load_tokenizer(str(tmp_path))

    # Assert
    assert isinstance(byte_tok, ByteTokenizer)
    assert byte_tok.decode(byte_tok.encode("héllo")) == "héllo"
    assert isinstance(hf_tok, HFTokenizer)
    assert hf_tok.encode("hello world") == [1, 2]


def test_a_small_mistral_config_equals_transformers(tmp_path: Path) -> None:
    # Prepare: Mistral's architecture with tiny shapes and an untied head.
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=None,
        initializer_range=0.3,
    )
    model = random_model(config, seed=5, dtype=torch.float32, device=CPU)
    export_hf_directory(model, tmp_path)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    prompt = torch.tensor(Oracle.prompt(6, 40))

    # Execute
    with torch.inference_mode():
        ours = model(prompt, torch.arange(40), dense_causal_attend)
        theirs = hf_model(prompt[None]).logits[0]

    # Assert
    assert type(hf_model).__name__ == "MistralForCausalLM"
    torch.testing.assert_close(ours, theirs, **TOL)
