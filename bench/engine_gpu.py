"""Engine benchmark on one GPU: prefill MFU, decode throughput vs transformers, roofline.

Usage: `python bench/engine_gpu.py --out DIR [--quick]` (defaults: llama-3-8b preset, random
weights, bf16, cuda). One invocation measures, in the same process on the same card:

* the dense matmul rate (bf16 GEMM) and the HBM bandwidth (a large device-to-device copy);
* prefill of 1K/8K/32K tokens in one chunk: achieved TFLOP/s and MFU against that matmul rate
  (FLOPs = 2 x non-embedding params per token + causal attention 4 x heads x head_dim x
  attended keys per layer);
* decode tokens/s at batch 1/16/64 and context 1K/8K, against `transformers`' `generate` on
  the same weights, and as a fraction of the bandwidth roofline (weights + KV read per step);
* calibration points: prefill time vs chunk tokens and context, decode step time vs batch and
  context;
* profiles of decode steps (default batch 1 / 8K and batch 64 / 1K context; torch profiler,
  GPU kernel time per step, top kernels by time), so the next bottleneck is visible.

Writes DIR/engine_gpu.json (everything) and DIR/calibration.json (the simulator's format:
{"gpu", "model", "prefill": [{"tokens", "context_tokens", "time_s"}],
"decode": [{"batch", "context_tokens", "time_s"}]}), and prints a table. Points that do not fit
in memory are reported as such, never attempted. Decode uses KV rows filled by `begin_import`
without computing them: the kernels read the same bytes, and it avoids minutes of prefill.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataplane.engine.engine import Engine, EngineConfig  # noqa: E402
from dataplane.engine.types import KVMetadata, SamplingParams  # noqa: E402
from dataplane.models.llama import LlamaForCausalLM, ModelShape  # noqa: E402
from dataplane.models.loading import hf_state_dict, parse_dtype, random_model  # noqa: E402
from dataplane.models.presets import preset_config  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--quick", action="store_true", help="fewer points and repetitions")
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="llama-3-8b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefill-tokens", type=_ints, default=None, help="default 1024,8192,32768")
    p.add_argument("--decode-batches", type=_ints, default=[1, 16, 64])
    p.add_argument("--decode-contexts", type=_ints, default=None, help="default 1024,8192")
    p.add_argument("--decode-steps", type=int, default=None, help="timed steps (default 32)")
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--copy-mib", type=int, default=4096)
    p.add_argument("--no-transformers", action="store_true", help="skip the generate baseline")
    p.add_argument("--no-split-kv", action="store_true", help="decode with the prefill kernel")
    p.add_argument(
        "--profile-points", default="1x8192,64x1024", help="BATCHxCONTEXT,... ('' for none)"
    )
    p.add_argument("--profile-steps", type=int, default=10)
    args = p.parse_args(argv)
    if args.prefill_tokens is None:
        args.prefill_tokens = [1024, 8192] if args.quick else [1024, 8192, 32768]
    if args.decode_contexts is None:
        args.decode_contexts = [1024] if args.quick else [1024, 8192]
    if args.decode_steps is None:
        args.decode_steps = 16 if args.quick else 32
    args.repeats = 2 if args.quick else 3
    return args


class Timer:
    """Wall-clock timing with device synchronization around the measured call."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object], repeats: int) -> float:
        """Median seconds of `repeats` calls after one warm-up call."""
        fn()
        times = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def measure_matmul_flops(timer: Timer, n: int, dtype: torch.dtype) -> float:
    """Dense GEMM rate in FLOP/s for n x n x n in `dtype`."""
    a = torch.randn(n, n, device=timer.device, dtype=dtype)
    b = torch.randn(n, n, device=timer.device, dtype=dtype)
    reps = 10
    seconds = timer.time(lambda: [a @ b for _ in range(reps)], 3)
    return 2 * n**3 * reps / seconds


def measure_bandwidth(timer: Timer, mib: int) -> float:
    """Device memory bandwidth in bytes/s from a large copy (read + write counted)."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device=timer.device)
    dst = torch.empty_like(src)
    reps = 5
    seconds = timer.time(lambda: [dst.copy_(src) for _ in range(reps)], 3)
    return 2 * src.numel() * reps / seconds


def prefill_flops(shape: ModelShape, tokens: int, context: int) -> float:
    """Model FLOPs of a prefill chunk of `tokens` after `context` cached tokens."""
    h = shape.hidden_size
    embed = shape.vocab_size * h * (1 if shape.tie_word_embeddings else 2)
    dense = 2 * tokens * (shape.num_params() - embed) + 2 * h * shape.vocab_size
    attended = tokens * context + tokens * (tokens + 1) // 2
    attention = 4 * shape.num_layers * shape.num_q_heads * shape.head_dim * attended
    return float(dense + attention)


def decode_bytes(shape: ModelShape, dtype: torch.dtype, batch: int, context: int) -> float:
    """Bytes one decode step must move: all weights but the embedding table, plus KV read."""
    item = torch.empty((), dtype=dtype).element_size()
    table = 0 if shape.tie_word_embeddings else shape.vocab_size * shape.hidden_size
    weights = (shape.num_params() - table) * item
    return float(weights + batch * (context + 1) * shape.kv_bytes_per_token(dtype))


def random_prompt(vocab: int, n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = torch.randint(0, vocab, (n,), generator=gen).tolist()
    return ids


def bench_prefill(engine: Engine, timer: Timer, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One-chunk prefills from empty, then chunks after a cached context (calibration)."""
    shape = engine.model.shape
    top = max(args.prefill_tokens)
    runs = [(n, 0) for n in args.prefill_tokens]
    runs += [(n, c) for c in (top // 4, top // 2) for n in (top // 8, top // 2) if n and c]
    points: list[dict[str, Any]] = []
    for idx, (tokens, context) in enumerate(runs):
        prompt = random_prompt(shape.vocab_size, context + tokens, idx)
        times = []
        for rep in range(args.repeats + 1):  # repetition 0 warms up
            rid = f"prefill-{idx}-{rep}"
            engine.add_request(
                rid, prompt, SamplingParams(max_new_tokens=2), chunk_tokens=context or tokens
            )
            if context:
                engine.step()  # the cached context, untimed
                engine.pause(rid)
                engine.resume(rid, chunk_tokens=tokens)
            timer.sync()
            start = time.perf_counter()
            engine.step()  # ends with a host read of the sampled token
            timer.sync()
            if rep:
                times.append(time.perf_counter() - start)
            engine.cancel(rid)
        seconds = statistics.median(times)
        flops = prefill_flops(shape, tokens, context)
        points.append(
            {
                "tokens": tokens,
                "context_tokens": context,
                "time_s": seconds,
                "tflops": flops / seconds / 1e12,
            }
        )
    return points


def start_decodes(engine: Engine, batch: int, context: int, steps: int) -> list[str] | None:
    """Import `batch` requests at `context` ready to decode `steps` tokens, then run 3 warm-up
    steps; returns their ids, or None if they do not fit."""
    shape = engine.model.shape
    rows = context + steps + 8
    if batch * rows > engine.kv.allocator.largest_free_tokens or rows > engine.max_model_tokens:
        return None
    ids = [f"d{batch}-{context}-{i}" for i in range(batch)]
    prompt = random_prompt(shape.vocab_size, context, batch)
    for rid in ids:
        meta = KVMetadata(
            request_id=rid,
            prompt_token_ids=tuple(prompt),
            output_token_ids=(prompt[-1],),
            num_kv_tokens=context,
            num_layers=shape.num_layers,
            num_kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
            dtype=str(engine.dtype),
            sampling=SamplingParams(max_new_tokens=steps + 8),
            generator_state=None,
        )
        engine.begin_import(meta)  # rows keep whatever finite values the pool holds
        engine.finish_import(rid)
    for _ in range(3):
        engine.step()
    return ids


def bench_decode(
    engine: Engine, timer: Timer, batch: int, context: int, steps: int
) -> float | None:
    """Seconds per decode step of `batch` requests at `context`; None if they do not fit."""
    ids = start_decodes(engine, batch, context, steps)
    if ids is None:
        return None
    timer.sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    timer.sync()
    seconds = (time.perf_counter() - start) / steps
    for rid in ids:
        engine.cancel(rid)
    return seconds


def profile_decode(
    engine: Engine, timer: Timer, batch: int, context: int, steps: int, top: int = 12
) -> dict[str, Any] | None:
    """GPU kernel time per decode step at one point, and the `top` kernels by time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    ids = start_decodes(engine, batch, context, steps)
    if ids is None:
        return None
    timer.sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        timer.sync()
        wall_s = time.perf_counter() - start
    for rid in ids:
        engine.cancel(rid)
    kernels = [
        (event.key, event.self_device_time_total, event.count)
        for event in prof.key_averages()
        if event.device_type == DeviceType.CUDA and event.self_device_time_total > 0
    ]
    kernels.sort(key=lambda k: -k[1])
    total_us = sum(us for _, us, _ in kernels)
    return {
        "batch": batch,
        "context_tokens": context,
        "steps": steps,
        "wall_ms_per_step": wall_s * 1e3 / steps,
        "kernel_ms_per_step": total_us / 1e3 / steps,
        "top_kernels": [
            {"name": name, "ms_per_step": us / 1e3 / steps, "calls_per_step": count / steps}
            for name, us, count in kernels[:top]
        ],
    }


def transformers_model(model: LlamaForCausalLM, dtype: torch.dtype, device: torch.device) -> Any:
    """transformers' own model for the same config, holding a copy of the same weights."""
    from transformers import AutoModelForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
                model.config, attn_implementation="sdpa"
            )
    finally:
        torch.set_default_dtype(previous)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    tied = ("lm_head.weight",) if model.shape.tie_word_embeddings else ()
    if unexpected or [m for m in missing if not m.endswith("inv_freq") and m not in tied]:
        raise RuntimeError(f"weights do not map: missing {missing} unexpected {unexpected}")
    return hf.eval()


def bench_transformers_decode(
    hf: Any, timer: Timer, batch: int, context: int, steps: int, vocab: int
) -> float | None:
    """Seconds per decode step of `generate` (greedy): (time(1 + steps) - time(1)) / steps."""
    ids = torch.tensor(
        [random_prompt(vocab, context, b) for b in range(batch)], device=timer.device
    )
    mask = torch.ones_like(ids)

    def generate(new_tokens: int) -> None:
        with torch.inference_mode():
            hf.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

    try:
        prefill_s = timer.time(lambda: generate(1), 1)
        total_s = timer.time(lambda: generate(1 + steps), 1)
    except torch.OutOfMemoryError:
        return None
    finally:
        if timer.device.type == "cuda":
            torch.cuda.empty_cache()
    return (total_s - prefill_s) / steps


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    timer = Timer(device)
    gpu = device_name(device)
    print(f"# engine benchmark: {args.preset} {dtype} on {gpu}", flush=True)
    matmul = measure_matmul_flops(timer, args.matmul_size, dtype)
    bandwidth = measure_bandwidth(timer, args.copy_mib)
    print(f"dense matmul {matmul / 1e12:.1f} TFLOP/s, copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the engine sizes its KV pool from free memory

    model = random_model(preset_config(args.preset), seed=args.seed, dtype=dtype, device=device)
    shape = model.shape
    steps = args.decode_steps
    longest = max(
        [t + 8 for t in args.prefill_tokens] + [c + steps + 8 for c in args.decode_contexts]
    )
    budget = None
    if device.type != "cuda":
        budget = 4 * longest * max(args.decode_batches) * shape.kv_bytes_per_token(dtype)
    engine = Engine(
        model,
        EngineConfig(
            max_batch_tokens=max(args.prefill_tokens + args.decode_batches),
            max_batch_seqs=max(args.decode_batches),
            kv_budget_bytes=budget,
            max_model_tokens=max(longest, shape.max_position_tokens),
            split_kv_decode=not args.no_split_kv,
        ),
    )
    decode_kernel = "split-kv" if engine.split_kv_decode else engine.kernel.value
    print(
        f"attention kernel {engine.kernel.value} (decode {decode_kernel}), CUDA graphs "
        f"{engine.graphs is not None}, KV pool {engine.kv.pool_tokens} tokens "
        f"({engine.kv_plan.source})"
    )
    prefill = bench_prefill(engine, timer, args)
    for prefill_point in prefill:
        prefill_point["mfu"] = prefill_point["tflops"] * 1e12 / matmul
    decode: list[dict[str, Any]] = []
    for context in args.decode_contexts:
        for batch in args.decode_batches:
            seconds = bench_decode(engine, timer, batch, context, steps)
            point: dict[str, Any] = {"batch": batch, "context_tokens": context, "time_s": seconds}
            if seconds is not None:
                roofline_s = decode_bytes(shape, dtype, batch, context) / bandwidth
                point.update(tokens_per_s=batch / seconds, roofline_fraction=roofline_s / seconds)
            decode.append(point)
    profiles = []
    if device.type == "cuda":
        for spec in filter(None, args.profile_points.split(",")):
            batch, context = (int(x) for x in spec.split("x"))
            profiles.append(profile_decode(engine, timer, batch, context, args.profile_steps))
    kernel = engine.kernel.value
    graphs = "on" if engine.graphs is not None else f"off ({engine.graph_error or 'disabled'})"
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the KV pool goes back before transformers allocates its cache

    if not args.no_transformers:
        hf = transformers_model(model, dtype, device)
        del model
        for point in decode:
            hf_s = (
                bench_transformers_decode(
                    hf, timer, point["batch"], point["context_tokens"], steps, shape.vocab_size
                )
                if point["time_s"] is not None
                else None
            )
            point["transformers_time_s"] = hf_s
            if hf_s is not None and point["time_s"] is not None:
                point["transformers_tokens_per_s"] = point["batch"] / hf_s
                point["speedup_vs_transformers"] = hf_s / point["time_s"]

    report = {
        "gpu": gpu,
        "model": args.preset,
        "dtype": str(dtype),
        "attention_kernel": kernel,
        "decode_attention": decode_kernel,
        "decode_cuda_graphs": graphs,
        "torch": torch.__version__,
        "matmul_tflops": matmul / 1e12,
        "bandwidth_gbps": bandwidth / 1e9,
        "prefill": prefill,
        "decode": decode,
        "decode_profiles": profiles,
    }
    calibration = {
        "gpu": gpu,
        "model": args.preset,
        "prefill": [
            {"tokens": p["tokens"], "context_tokens": p["context_tokens"], "time_s": p["time_s"]}
            for p in prefill
        ],
        "decode": [
            {"batch": d["batch"], "context_tokens": d["context_tokens"], "time_s": d["time_s"]}
            for d in decode
            if d["time_s"] is not None
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_gpu.json").write_text(json.dumps(report, indent=2))
    (args.out / "calibration.json").write_text(json.dumps(calibration, indent=2))
    print_table(report)
    return 0


def _fmt(value: float | None, spec: str) -> str:
    return "does not fit" if value is None else format(value, spec)


def print_table(report: dict[str, Any]) -> None:
    """The human-readable summary of `report`."""
    print(f"\n## prefill ({report['model']}, {report['gpu']}, kernel {report['attention_kernel']})")
    print(f"{'tokens':>8} {'context':>8} {'time_s':>9} {'TFLOP/s':>8} {'MFU':>6}")
    for p in report["prefill"]:
        print(
            f"{p['tokens']:>8} {p['context_tokens']:>8} {p['time_s']:>9.4f} "
            f"{p['tflops']:>8.1f} {p['mfu']:>6.1%}"
        )
    print(
        f"\n## decode (attention {report['decode_attention']}, tokens/s; transformers generate "
        "on the same GPU and weights)"
    )
    print(
        f"{'batch':>6} {'context':>8} {'step_ms':>9} {'tok/s':>9} {'hf tok/s':>9} "
        f"{'speedup':>8} {'roofline':>9}"
    )
    for d in report["decode"]:
        step_ms = None if d["time_s"] is None else d["time_s"] * 1e3
        print(
            f"{d['batch']:>6} {d['context_tokens']:>8} {_fmt(step_ms, '9.2f'):>9} "
            f"{_fmt(d.get('tokens_per_s'), '9.0f'):>9} "
            f"{_fmt(d.get('transformers_tokens_per_s'), '9.0f'):>9} "
            f"{_fmt(d.get('speedup_vs_transformers'), '8.2f'):>8} "
            f"{_fmt(d.get('roofline_fraction'), '9.1%'):>9}"
        )
    for prof in report["decode_profiles"]:
        if prof is None:
            continue
        print(
            f"\n## decode profile: batch {prof['batch']}, context {prof['context_tokens']}: "
            f"{prof['kernel_ms_per_step']:.2f} ms of GPU kernels per step, "
            f"{prof['wall_ms_per_step']:.2f} ms wall (profiled)"
        )
        print(f"{'ms/step':>8} {'calls':>6}  kernel")
        for k in prof["top_kernels"]:
            print(f"{k['ms_per_step']:>8.3f} {k['calls_per_step']:>6.0f}  {k['name'][:90]}")


if __name__ == "__main__":
    sys.exit(main())
