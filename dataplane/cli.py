"""`pecsched generate` and `pecsched model export`: run or write a model locally.

Only argparse is imported here; torch and transformers load inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: Any) -> None:
    """Add `generate` and `model export` to the `pecsched` command."""
    gen = subparsers.add_parser(
        "generate", help="run one engine locally on a prompt and print the output"
    )
    gen.add_argument("--model", required=True, help="preset name or local HF model directory")
    gen.add_argument("--seed", type=int, default=0, help="weight seed for presets")
    gen.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    gen.add_argument(
        "--dtype",
        default=None,
        help="float32|bfloat16|float16 (default: fp32 on cpu, bf16 on cuda)",
    )
    gen.add_argument("--chunk-tokens", type=int, default=512, help="prefill chunk size")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (tokenized by the model's tokenizer)")
    source.add_argument("--token-ids", help="prompt as comma-separated token ids")
    gen.add_argument("--max-tokens", type=int, required=True, help="tokens to generate")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    gen.add_argument("--sample-seed", type=int, default=0, help="seed of the sampler")
    gen.add_argument("--json", action="store_true", help='print {"token_ids": [...], "text": ...}')
    gen.set_defaults(handler=_generate)

    model = subparsers.add_parser("model", help="model utilities")
    model_sub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    export = model_sub.add_parser(
        "export", help="write a preset's seeded weights as an HF directory"
    )
    export.add_argument("preset", help="preset name")
    export.add_argument("directory", help="output directory (config.json + model.safetensors)")
    export.add_argument("--seed", type=int, default=0, help="weight seed")
    export.add_argument("--dtype", default="float32", help="float32|bfloat16|float16")
    export.set_defaults(handler=_export)
    __import__("dataplane.agent.cli", fromlist=["register"]).register(subparsers)


def _generate(args: argparse.Namespace) -> int:
    import torch

    from dataplane.engine.engine import Engine, EngineConfig
    from dataplane.engine.errors import EngineError
    from dataplane.engine.types import Finished, SamplingParams
    from dataplane.models.loading import parse_dtype, resolve_model
    from dataplane.models.tokenizer import load_tokenizer

    try:
        device = torch.device(args.device)
        dtype = parse_dtype(args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
        tokenizer = load_tokenizer(args.model)
        if args.token_ids is not None:
            prompt = [int(t) for t in args.token_ids.split(",") if t.strip()]
        else:
            prompt = tokenizer.encode(args.prompt)
        model = resolve_model(args.model, seed=args.seed, dtype=dtype, device=device)
        eos = model.config.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        sampling = SamplingParams(
            max_new_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.sample_seed,
            eos_token_ids=eos_ids,
        )
        rows = len(prompt) + args.max_tokens
        budget = None if device.type == "cuda" else rows * model.shape.kv_bytes_per_token(dtype)
        engine = Engine(
            model,
            EngineConfig(
                max_batch_tokens=max(args.chunk_tokens, 1),
                max_batch_seqs=1,
                chunk_tokens=args.chunk_tokens,
                kv_budget_bytes=budget,
            ),
        )
        engine.add_request("cli", prompt, sampling)
        output: list[int] = []
        while engine.has_runnable_work():
            for event in engine.step():
                if isinstance(event, Finished):
                    output = list(event.output_token_ids)
    except (ValueError, EngineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = tokenizer.decode(output)
    if args.json:
        print(json.dumps({"token_ids": output, "text": text}))
    else:
        print(text)
    return 0


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from dataplane.models.loading import export_hf_directory, parse_dtype, random_model
    from dataplane.models.presets import preset_config

    try:
        config = preset_config(args.preset)
        dtype = parse_dtype(args.dtype)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = random_model(config, seed=args.seed, dtype=dtype, device=torch.device("cpu"))
    export_hf_directory(model, Path(args.directory))
    print(f"wrote {args.preset} (seed {args.seed}, {args.dtype}) to {args.directory}")
    return 0
