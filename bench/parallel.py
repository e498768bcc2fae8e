"""SP prefill scaling (Ulysses vs ring over k GPUs or CPU workers) and KV transfer throughput.

    .venv/bin/python bench/parallel.py [--device cpu|cuda] [--model tiny]
        [--prompt-tokens 8192[,32768,...]] [--chunk-tokens 2048] [--sizes 1,2,4] [--kinds ulysses,ring]
        [--repeats 3] [--kv-tokens 1024,32768] [--threads 1] [--json out.json]

Spawns max(sizes) worker processes (CPU: gloo, `--threads` torch threads each; CUDA: one process
per GPU, NCCL, bf16) that rendezvous through a TCPStore hosted here, exactly as workers do
under an agent. For each SP kind and size k, the first k workers form a group, warm up on a
4096-token prompt, and then run an `SpRequest` per prompt length: the whole prompt in chunks,
then 8 decode steps; the time is the slowest member's, median of `--repeats`. "engine" is the
plain single-worker engine (no SP code at all) on the same prompt: the baseline of speed-up
and efficiency (= engine time / (k x SP time)).
KV transfer: worker 0 streams a synthetic request's KV (all layers, K and V) of each
`--kv-tokens` size to worker 1 with `KVSender`/`KVReceiver`, polling as the agent would; bytes /
wall time, median of max(3, `--repeats`) after one warm-up. On CUDA the same tensors are then copied GPU 0 -> GPU 1 with plain device-to-device
copies in this process (peer-to-peer where the pair allows it): the card pair's copy bandwidth,
measured in the same run, which the transfer is compared against.
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

TIMEOUT_S = 600.0
NUM_DECODE_STEPS = 8
WARMUP_PROMPT_TOKENS = 4096


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sp_run(
    model: Any, group: Any, prompt: list[int], args: Any, kind: Any
) -> tuple[float, float, float]:
    """One SP prefill + decode; returns this member's (prefill_s, decode_s_per_token,
    prefill CPU s of this process: robust to other load on a shared machine)."""
    from dataplane.parallel.sp_runner import SpRequest

    sp = SpRequest(
        model,
        group,
        "bench",
        prompt,
        max_new_tokens=NUM_DECODE_STEPS + 1,
        chunk_tokens=args.chunk_tokens,
        kind=kind,
    )
    group.barrier()
    t0, cpu0 = time.perf_counter(), time.process_time()
    logits = None
    while not sp.is_prefill_done:
        logits = sp.run_next_chunk()
    token = sp.share_token(None if logits is None else int(logits.argmax()))
    _sync(sp.device)
    t1, cpu1 = time.perf_counter(), time.process_time()
    for _ in range(NUM_DECODE_STEPS):
        token = int(sp.decode(token).argmax())
    _sync(sp.device)
    t2 = time.perf_counter()
    sp.free()
    return t1 - t0, (t2 - t1) / NUM_DECODE_STEPS, cpu1 - cpu0


def _engine_run(model: Any, prompt: list[int], args: Any) -> float:
    import torch

    from dataplane.engine.engine import Engine, EngineConfig
    from dataplane.engine.types import SamplingParams

    budget = (len(prompt) + 64) * model.shape.kv_bytes_per_token(next(model.parameters()).dtype)
    engine = Engine(
        model,
        EngineConfig(
            chunk_tokens=args.chunk_tokens,
            max_batch_tokens=args.chunk_tokens,
            kv_budget_bytes=budget,
            max_model_tokens=len(prompt) + 64,
        ),
    )
    engine.add_request("bench", prompt, SamplingParams(max_new_tokens=1))
    t0 = time.perf_counter()
    while engine.has_runnable_work():
        engine.step()
    _sync(torch.device(engine.device))
    return time.perf_counter() - t0


def _kv_run(
    manager: Any, rank: int, model: Any, num_tokens: int, tag: str
) -> tuple[float, float] | None:
    """Stream `num_tokens` tokens of synthetic KV from worker 0 to worker 1 with the transfer
    protocol, then the same tensors with bare sends/receives all posted at once (the NCCL or
    gloo floor); returns (protocol s, bare s) on rank 1."""
    import gc
    import types

    import torch

    from dataplane.engine.types import KVExport, KVMetadata, SamplingParams
    from dataplane.parallel.groups import GroupSpec
    from dataplane.parallel.kv_transfer import KVReceiver, KVSender, TransferState

    shape = model.shape
    dtype = next(model.parameters()).dtype
    group = manager.connect(GroupSpec(f"kv-{tag}", ("w0", "w1")))
    device = group.device
    kv_shape = (num_tokens, shape.num_kv_heads, shape.head_dim)
    meta = KVMetadata(
        "bench",
        tuple([1] * num_tokens),
        (2,),
        num_tokens,
        shape.num_layers,
        shape.num_kv_heads,
        shape.head_dim,
        str(dtype),
        SamplingParams(4),
        None,
    )
    if rank == 0:
        keys, values = (_synthetic_kv(kv_shape, shape.num_layers, dtype, device) for _ in "kv")
        transfer: Any = KVSender(group, 1, KVExport(meta, keys, values), timeout_s=TIMEOUT_S)
    else:
        keys, values = (
            tuple(
                torch.empty(kv_shape, dtype=dtype, device=device) for _ in range(shape.num_layers)
            )
            for _ in "kv"
        )
        target = types.SimpleNamespace(request_id="bench", keys=keys, values=values)
        transfer = KVReceiver(
            group, 0, lambda _: target, lambda _: None, lambda _: None, timeout_s=TIMEOUT_S
        )
    group.barrier()
    t0 = time.perf_counter()
    while transfer.poll() not in (TransferState.DONE, TransferState.FAILED):
        time.sleep(0.0002)
    _sync(device)
    protocol_s = time.perf_counter() - t0
    if transfer.state is not TransferState.DONE:
        raise RuntimeError(f"KV transfer failed: {transfer.failure()}")
    group.barrier()
    t0 = time.perf_counter()
    tensors = [t for pair in zip(keys, values, strict=True) for t in pair]
    post = group.send if rank == 0 else group.recv
    for work in [post(t, 1 - rank) for t in tensors]:
        work.wait()
    _sync(device)
    bare_s = time.perf_counter() - t0
    manager.destroy(f"kv-{tag}")
    del transfer, keys, values, tensors
    gc.collect()  # free this size's buffers before the next one is allocated
    return (protocol_s, bare_s) if rank == 1 else None


def _synthetic_kv(
    kv_shape: tuple[int, ...], num_layers: int, dtype: Any, device: Any
) -> tuple[Any, ...]:
    """One (tokens, kv_heads, head_dim) tensor of random values per layer."""
    import torch

    return tuple(torch.randn(kv_shape, device=device).to(dtype) for _ in range(num_layers))


def _p2p_copy_s(model_name: str, num_tokens: int, repeats: int) -> float:
    """Median seconds to copy the K and V of `num_tokens` tokens (per-layer tensors, as the
    transfer sends them) from GPU 0 to GPU 1 with device-to-device copies."""
    import torch

    from dataplane.models.llama import ModelShape
    from dataplane.models.presets import preset_config

    shape = ModelShape.from_config(preset_config(model_name))
    kv_shape = (num_tokens, shape.num_kv_heads, shape.head_dim)
    src = [
        torch.empty(kv_shape, dtype=torch.bfloat16, device="cuda:0")
        for _ in range(2 * shape.num_layers)
    ]
    dst = [torch.empty_like(t, device="cuda:1") for t in src]
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize("cuda:0")
        torch.cuda.synchronize("cuda:1")
        t0 = time.perf_counter()
        for s, d in zip(src, dst, strict=True):
            d.copy_(s, non_blocking=True)
        torch.cuda.synchronize("cuda:0")
        torch.cuda.synchronize("cuda:1")
        times.append(time.perf_counter() - t0)
    del src, dst
    torch.cuda.empty_cache()
    return statistics.median(times[1:])


def _worker(rank: int, port: int, args: Any, results: Any) -> None:
    import torch

    from dataplane.models.loading import resolve_model
    from dataplane.parallel.groups import (
        GroupManager,
        GroupSpec,
        connect_store,
        make_backend_factory,
    )
    from dataplane.parallel.topology import SpKind

    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device, dtype = torch.device("cuda", rank), torch.bfloat16
    else:
        device, dtype = torch.device("cpu"), torch.float32
    model = resolve_model(args.model, seed=0, dtype=dtype, device=device)
    store = connect_store("127.0.0.1", port, TIMEOUT_S)
    manager = GroupManager(store, f"w{rank}", make_backend_factory(device, "127.0.0.1"), TIMEOUT_S)
    gen = torch.Generator().manual_seed(0)
    lengths = _ints(args.prompt_tokens)
    prompts = {
        n: torch.randint(0, model.shape.vocab_size, (n,), generator=gen).tolist()
        for n in [WARMUP_PROMPT_TOKENS, *lengths]
    }
    sizes = _ints(args.sizes)
    with torch.inference_mode():
        if max(sizes) >= 2 and rank < 2:
            for num_tokens in _ints(args.kv_tokens):
                elapsed = [
                    _kv_run(manager, rank, model, num_tokens, f"{num_tokens}-{i}")
                    for i in range(max(args.repeats, 3) + 1)
                ]
                if rank == 1:
                    times = [e for e in elapsed[1:] if e is not None]
                    protocol = statistics.median(t[0] for t in times)
                    bare = statistics.median(t[1] for t in times)
                    results.put(("kv", 2, num_tokens, (protocol, bare, 0.0)))
        if rank == 0:
            _engine_run(model, prompts[WARMUP_PROMPT_TOKENS], args)
        groups: dict[tuple[str, int], Any] = {}  # (kind, k) -> group, warmed up
        for n in sorted(lengths):  # shortest first: a run cut short still reports the shorter ones
            if rank == 0:
                times = [_engine_run(model, prompts[n], args) for _ in range(args.repeats)]
                results.put(("engine", 1, n, (statistics.median(times), 0.0, 0.0)))
            for kind_name in args.kinds.split(","):
                kind = SpKind[kind_name.upper()]
                for k in sizes:
                    if rank >= k:
                        continue
                    group = groups.get((kind_name, k))
                    if group is None:
                        members = tuple(f"w{r}" for r in range(k))
                        group = manager.connect(GroupSpec(f"sp-{kind_name}-{k}", members))
                        _sp_run(model, group, prompts[WARMUP_PROMPT_TOKENS], args, kind)
                        groups[kind_name, k] = group
                    samples = [
                        _sp_run(model, group, prompts[n], args, kind) for _ in range(args.repeats)
                    ]
                    row = tuple(statistics.median(s[i] for s in samples) for i in range(3))
                    results.put((kind_name, k, n, row))
        for group in groups.values():
            manager.destroy(group.group_id)
    results.put(("done", rank, 0.0, None))
    manager.close()


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default="tiny", help="preset name or local HF directory")
    parser.add_argument("--prompt-tokens", default="8192", help="prompt lengths, comma-separated")
    parser.add_argument("--chunk-tokens", type=int, default=2048)
    parser.add_argument("--sizes", default="1,2,4", help="SP sizes, comma-separated")
    parser.add_argument("--kinds", default="ulysses,ring")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--kv-tokens", default="1024,16384", help="KV transfer sizes in tokens ('' for none)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per CPU worker")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args()

    from dataplane.parallel.groups import connect_store

    num_workers = max(_ints(args.sizes))
    num_workers = max(num_workers, 2) if args.kv_tokens else num_workers
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < num_workers:
            parser.error(
                f"--device cuda needs {num_workers} GPUs, found {torch.cuda.device_count()}"
            )
    master = connect_store("127.0.0.1", 0, TIMEOUT_S, is_master=True)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(r, master.port, args, results))
        for r in range(num_workers)
    ]
    for proc in procs:
        proc.start()
    rows: list[Row] = []
    done = 0
    while done < num_workers:
        try:
            row = results.get(timeout=1.0)
        except queue.Empty:
            dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:  # a worker raised (its traceback is on stderr): stop the others
                for proc in procs:
                    proc.kill()
                print(f"worker(s) {dead} failed", file=sys.stderr)
                return 1
            continue
        if row[0] == "done":
            done += 1
        else:
            rows.append(row)
            print(f"progress: {row}", file=sys.stderr, flush=True)
    for proc in procs:
        proc.join()
    p2p_s = {}
    if args.device == "cuda" and num_workers >= 2:
        p2p_s = {n: _p2p_copy_s(args.model, n, max(args.repeats, 3)) for n in _ints(args.kv_tokens)}
    _print(rows, p2p_s, args)
    if args.json is not None:
        payload = {"args": vars(args) | {"json": str(args.json)}, "rows": rows, "p2p_s": p2p_s}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


Row = tuple[str, int, int, tuple[float, float, float]]  # (kind, k, tokens, measurements)


def _print(rows: list[Row], p2p_s: dict[int, float], args: Any) -> None:
    engine = {n: m[0] for kind, _, n, m in rows if kind == "engine"}
    sp = {(kind, k, n): m for kind, k, n, m in rows if kind not in ("engine", "kv")}
    print(
        f"\nSP prefill in chunks of {args.chunk_tokens}, model {args.model}, device "
        f"{args.device}; the slowest member counts; speed-up and efficiency against the "
        "single-worker engine"
    )
    print(
        "| tokens | kind | k | prefill s | speed-up | efficiency | vs own k=1 | "
        "busiest member CPU s | decode ms/token |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in sorted(engine):
        print(f"| {n} | engine (no SP) | 1 | {engine[n]:.3f} | 1.00x | 100% | | | |")
        for (kind, k, length), (wall, decode, cpu) in sorted(sp.items()):
            if length != n:
                continue
            own_1 = sp.get((kind, 1, n), (wall, 0.0, 0.0))[0]
            speedup = engine[n] / wall
            print(
                f"| {n} | {kind} | {k} | {wall:.3f} | {speedup:.2f}x | {speedup / k:.0%} | "
                f"{own_1 / wall:.2f}x | {cpu:.3f} | {decode * 1e3:.1f} |"
            )
    kv = [(n, m[0], m[1]) for kind, _, n, m in rows if kind == "kv"]
    if kv:
        import torch

        from dataplane.models.llama import ModelShape
        from dataplane.models.presets import preset_config

        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        per_token = ModelShape.from_config(preset_config(args.model)).kv_bytes_per_token(dtype)
        print(
            "\n| KV tokens | GiB | transfer s | transfer GB/s | bare send/recv GB/s | "
            "device-to-device copy GB/s | transfer / copy |"
        )
        print("|---|---|---|---|---|---|---|")
        for n, elapsed, bare in kv:
            size = n * per_token
            copy = f"{size / p2p_s[n] / 1e9:.1f}" if n in p2p_s else ""
            ratio = f"{p2p_s[n] / elapsed:.0%}" if n in p2p_s else ""
            print(
                f"| {n} | {size / 2**30:.2f} | {elapsed:.4f} | {size / elapsed / 1e9:.1f} | "
                f"{size / bare / 1e9:.1f} | {copy} | {ratio} |"
            )


if __name__ == "__main__":
    raise SystemExit(main())
