"""Llama-family decoder in plain PyTorch, presets, HF weight loading, tokenizers."""
