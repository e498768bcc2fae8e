"""Llama-family decoder in plain PyTorch, presets, HF weight loading, tokenizers.

Public API:

* `LlamaForCausalLM(config)` (`dataplane.models.llama`): Llama 2/3, Mistral, Qwen2 from a
  transformers config; q/k/v and gate/up are fused GEMMs, and `hf_parameters(model)` names
  every weight (a fused one per row block) as transformers does. `model.shape` is a
  `ModelShape` (layers, heads, head_dim, KV bytes per token, parameter count).
* `random_model`, `load_hf_directory`, `export_hf_directory`, `hf_state_dict`, `resolve_model`,
  `parse_dtype` (`dataplane.models.loading`); `preset_config`, `PRESET_NAMES` (`dataplane.models.presets`);
  `load_tokenizer`, `ByteTokenizer`, `HFTokenizer` (`dataplane.models.tokenizer`).

The forward contract (what sequence-parallel code plugs into)::

    logits = model(input_ids, positions, attend, logits_indices=None)
        input_ids (T,) int64, positions (T,) int64: any tokens of any sequences, at any
        absolute positions (RoPE uses `positions`, nothing else)
        attend(layer_idx, q (T, Hq, D), k (T, Hkv, D), v (T, Hkv, D)) -> (T, Hq, D)
            called once per layer with RoPE already applied; owns the KV cache and kernel
        logits_indices (N,) int64: rows whose logits are computed -> (N, vocab) float32

Implementations of `attend` (`dataplane.models.attention`): `dense_causal_attend` (one
sequence, no cache) and `CachedAttention` (per-layer KV pools, varlen batches of decodes and
prefill chunks; on CUDA decodes by the Triton split-KV kernel of `decode_attention`).
Triton code (`decode_attention`, `triton_ops`) is imported only on CUDA; `fused` picks the
Triton or the torch path of RoPE, residual add + RMSNorm and the KV store per tensor. A
Ulysses/ring wrapper replaces `attend` and may call an inner `attend` with a head shard:
implementations read head counts from the tensors.
"""
