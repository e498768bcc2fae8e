"""Model construction: seeded random weights, local HF directories, and export to HF format.

* `random_model(config, seed, dtype, device)` builds the decoder on the meta device and fills
  it on `device` with a seeded normal init (std = `config.initializer_range`; norm weights
  1 + N(0, 0.1) so their loading is exercised too). The same seed gives the same weights on the
  same device type and dtype.
* `load_hf_directory(path, dtype, device)` reads `config.json` and the safetensors checkpoint
  (single file or sharded with an index), one tensor at a time, straight into the parameters
  (q/k/v and gate/up into their row blocks of the fused projections: concatenated at load time).
* `export_hf_directory(model, path)` writes `config.json` + `model.safetensors` that
  `transformers.AutoModelForCausalLM.from_pretrained(path)` loads as is.
* `hf_state_dict(model)` is the model's weights under `transformers`' names (fused projections
  split back), e.g. for `transformers`' own `load_state_dict`.

All of them walk `hf_parameters` (`dataplane.models.llama`), the one map between the HF names
and this model's (possibly fused) parameters.
* `resolve_model(spec, ...)` accepts a preset name or a directory, as every `--model` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dataplane.models.llama import LlamaForCausalLM, hf_parameters
from dataplane.models.presets import PRESET_NAMES, preset_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_dtype(name: str) -> torch.dtype:
    """`float32|bfloat16|float16` (or fp32/bf16/fp16) -> torch dtype; bad names list choices."""
    key = DTYPE_ALIASES.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported (choose from {', '.join(DTYPES)})")
    return DTYPES[key]


def random_model(
    config: Any, *, seed: int, dtype: torch.dtype, device: torch.device
) -> LlamaForCausalLM:
    """The decoder for `config` with seeded random weights, in eval mode, on `device`.

    Each HF-named tensor is drawn in HF order as a tensor of its own shape would be, so the
    weights do not depend on which projections are fused.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()
    std = float(getattr(config, "initializer_range", 0.02))
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in hf_parameters(model):
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.1, generator=gen)
            else:
                param.normal_(0.0, std, generator=gen)
    return model.eval()


def load_hf_directory(path: Path, *, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """Load a local HF model directory (config.json + safetensors, one file or sharded)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise ValueError(f"model directory {path} has no config.json")
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()
    targets = dict(hf_parameters(model))
    with torch.no_grad():
        for file in _checkpoint_files(path):
            with safe_open(str(file), framework="pt") as checkpoint:
                for name in checkpoint.keys():  # noqa: SIM118 - safe_open is not a mapping
                    target = targets.pop(name, None)
                    if target is None:
                        continue  # e.g. rotary inv_freq buffers of old checkpoints
                    tensor = checkpoint.get_tensor(name)
                    if tensor.shape != target.shape:
                        raise ValueError(
                            f"{file.name}: {name} has shape {tuple(tensor.shape)}, "
                            f"the config implies {tuple(target.shape)}"
                        )
                    target.copy_(tensor)
    if targets:
        raise ValueError(f"checkpoint in {path} lacks parameters: {', '.join(list(targets)[:5])}")
    return model.eval()


def _checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of an HF directory: the index's shards, or model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / shard for shard in shards]
    single = path / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"model directory {path} has no model.safetensors(.index.json)")
    return [single]


def hf_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The weights under `transformers`' names (views into the model's parameters)."""
    return {name: tensor.detach() for name, tensor in hf_parameters(model)}


def export_hf_directory(model: LlamaForCausalLM, path: Path) -> None:
    """Write `model` as an HF directory: config.json + model.safetensors (tied head omitted)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    state = {name: t.to("cpu").contiguous() for name, t in hf_state_dict(model).items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    config.architectures = [_ARCHITECTURES[model.shape.model_type]]
    config.save_pretrained(path)


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def resolve_model(
    spec: str, *, seed: int, dtype: torch.dtype, device: torch.device
) -> LlamaForCausalLM:
    """A preset name (random weights from `seed`) or a local HF directory (seed unused)."""
    path = Path(spec)
    if path.is_dir():
        return load_hf_directory(path, dtype=dtype, device=device)
    if spec in PRESET_NAMES:
        return random_model(preset_config(spec), seed=seed, dtype=dtype, device=device)
    raise ValueError(
        f"--model {spec!r} is neither a directory nor a preset (presets: {', '.join(PRESET_NAMES)})"
    )
