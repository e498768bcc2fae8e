"""Fused q/k/v and gate/up projections: the HF name map, equality with the unfused layers of
transformers, and refusals of checkpoints that do not fill a fused projection.

Tolerances: float32 on CPU; a fused GEMM computes each output column exactly as the separate
one does (same row of weights, same reduction), so outputs agree to 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import CPU, Oracle
from safetensors.torch import load_file, save_file

from dataplane.models.llama import hf_parameters
from dataplane.models.loading import export_hf_directory, hf_state_dict, load_hf_directory

TOL = {"rtol": 1e-5, "atol": 1e-5}


def test_hf_parameters_name_every_transformers_parameter_once(oracle: Oracle) -> None:
    # Execute
    ours = list(hf_parameters(oracle.model))
    theirs = dict(oracle.hf_model.named_parameters())

    # Assert
    assert sorted(name for name, _ in ours) == sorted(theirs)
    for name, tensor in ours:
        assert torch.equal(tensor, theirs[name]), name


def test_fused_projections_equal_the_unfused_layers(oracle: Oracle) -> None:
    # Prepare
    x = torch.randn(5, oracle.model.shape.hidden_size, generator=torch.Generator().manual_seed(0))
    layer, hf_layer = oracle.model.model.layers[1], oracle.hf_model.model.layers[1]

    # Execute
    with torch.inference_mode():
        qkv = layer.self_attn.qkv_proj(x)
        gate_up = layer.mlp.gate_up_proj(x)
        mlp = layer.mlp(x)
        want_qkv = torch.cat([hf_layer.self_attn.q_proj(x), hf_layer.self_attn.k_proj(x),
                              hf_layer.self_attn.v_proj(x)], dim=-1)  # fmt: skip
        want_gate_up = torch.cat([hf_layer.mlp.gate_proj(x), hf_layer.mlp.up_proj(x)], dim=-1)
        want_mlp = hf_layer.mlp.down_proj(
            F.silu(hf_layer.mlp.gate_proj(x)) * hf_layer.mlp.up_proj(x)
        )

    # Assert
    torch.testing.assert_close(qkv, want_qkv, **TOL)
    torch.testing.assert_close(gate_up, want_gate_up, **TOL)
    torch.testing.assert_close(mlp, want_mlp, **TOL)


def test_export_round_trip_refills_every_fused_row_block(oracle: Oracle, tmp_path: Path) -> None:
    # Execute
    export_hf_directory(oracle.model, tmp_path)
    loaded = load_hf_directory(tmp_path, dtype=torch.float32, device=CPU)

    # Assert
    want = hf_state_dict(oracle.model)
    got = hf_state_dict(loaded)
    assert got.keys() == want.keys()
    for name, tensor in got.items():
        assert torch.equal(tensor, want[name]), name


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("drop", "lacks parameters: model.layers.0.self_attn.k_proj.weight"),
        ("truncate", r"k_proj.weight has shape"),
    ],
)
def test_a_checkpoint_that_does_not_fill_a_fused_projection_is_refused(
    oracles: dict[str, Oracle], tmp_path: Path, edit: str, message: str
) -> None:
    # Prepare: the exported checkpoint with one part of layer 0's q/k/v removed or cut short.
    export_hf_directory(oracles["tiny"].model, tmp_path)
    file = tmp_path / "model.safetensors"
    state = load_file(str(file))
    name = "model.layers.0.self_attn.k_proj.weight"
    if edit == "drop":
        del state[name]
    else:
        state[name] = state[name][:-1].contiguous()
    save_file(state, str(file), metadata={"format": "pt"})

    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        load_hf_directory(tmp_path, dtype=torch.float32, device=CPU)
