"""SP prefill scaling (k = 1, 2, 4; Ulysses vs ring) and KV transfer throughput.

    .venv/bin/python bench/parallel.py [--device cpu|cuda] [--model tiny] [--prompt-tokens 8192]
        [--chunk-tokens 2048] [--sizes 1,2,4] [--kinds ulysses,ring] [--repeats 3]
        [--kv-mib 16,128] [--threads 1] [--json out.json]

Spawns max(sizes) worker processes (CPU: gloo, `--threads` torch threads each; CUDA: one process
per GPU, NCCL, bf16) that rendezvous through a TCPStore hosted here, exactly as workers do
under an agent. For each SP size k and kind, the first k workers form a fresh group and run an
`SpRequest`: the whole prompt in chunks, then 8 decode steps; the time is the slowest member's,
median of `--repeats` after one warm-up. The k = 1 row runs the same code on a one-member group,
and "engine" is the plain single-worker engine (no SP code at all) on the same prompt.
KV transfer: worker 0 streams a synthetic request's KV (all layers) to worker 1 with
`KVSender`/`KVReceiver`, polling as the agent would; bytes / wall time.
Prints Markdown tables; ratios are against k = 1 of the same kind.
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
        ),
    )
    engine.add_request("bench", prompt, SamplingParams(max_new_tokens=1))
    t0 = time.perf_counter()
    while engine.has_runnable_work():
        engine.step()
    _sync(torch.device(engine.device))
    return time.perf_counter() - t0


def _kv_run(manager: Any, rank: int, model: Any, mib: int, tag: str) -> float | None:
    """Stream `mib` MiB of synthetic KV from worker 0 to worker 1; returns seconds (rank 1)."""
    import torch

    from dataplane.engine.types import KVExport, KVMetadata, SamplingParams
    from dataplane.parallel.groups import GroupSpec
    from dataplane.parallel.kv_transfer import KVReceiver, KVSender, TransferState

    shape = model.shape
    dtype = next(model.parameters()).dtype
    per_token = shape.kv_bytes_per_token(dtype)
    num_tokens = max(1, (mib << 20) // per_token)
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
        keys = tuple(
            torch.randn(kv_shape, device=device).to(dtype) for _ in range(shape.num_layers)
        )
        transfer: Any = KVSender(group, 1, KVExport(meta, keys, keys), timeout_s=TIMEOUT_S)
    else:
        bufs = tuple(
            torch.empty(kv_shape, dtype=dtype, device=device) for _ in range(shape.num_layers)
        )

        class Target:
            request_id, keys, values = "bench", bufs, bufs

        transfer = KVReceiver(
            group, 0, lambda _: Target, lambda _: None, lambda _: None, timeout_s=TIMEOUT_S
        )
    group.barrier()
    t0 = time.perf_counter()
    while transfer.poll() not in (TransferState.DONE, TransferState.FAILED):
        time.sleep(0.0002)
    _sync(device)
    elapsed_s = time.perf_counter() - t0
    if transfer.state is not TransferState.DONE:
        raise RuntimeError(f"KV transfer failed: {transfer.failure()}")
    manager.destroy(f"kv-{tag}")
    return elapsed_s if rank == 1 else None


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
    prompt = torch.randint(0, model.shape.vocab_size, (args.prompt_tokens,), generator=gen).tolist()
    sizes = [int(s) for s in args.sizes.split(",")]
    with torch.inference_mode():
        if rank == 0:
            times = [_engine_run(model, prompt, args) for _ in range(args.repeats + 1)][1:]
            results.put(("engine", 1, statistics.median(times), None))
        for kind_name in args.kinds.split(","):
            kind = SpKind[kind_name.upper()]
            for k in sizes:
                if rank >= k:
                    continue
                members = tuple(f"w{r}" for r in range(k))
                samples = []
                for rep in range(args.repeats + 1):
                    group = manager.connect(GroupSpec(f"sp-{kind_name}-{k}-{rep}", members))
                    samples.append(_sp_run(model, group, prompt, args, kind))
                    manager.destroy(group.group_id)
                prefill = statistics.median(s[0] for s in samples[1:])
                decode = statistics.median(s[1] for s in samples[1:])
                cpu = statistics.median(s[2] for s in samples[1:])
                results.put((kind_name, k, prefill, (decode, cpu)))
        if max(sizes) >= 2 and rank < 2:
            for mib in [int(m) for m in args.kv_mib.split(",")]:
                elapsed = [
                    _kv_run(manager, rank, model, mib, f"{mib}-{i}")
                    for i in range(args.repeats + 1)
                ]
                if rank == 1:
                    results.put(
                        (
                            "kv",
                            mib,
                            statistics.median(e for e in elapsed[1:] if e is not None),
                            None,
                        )
                    )
    results.put(("done", rank, 0.0, None))
    manager.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default="tiny", help="preset name or local HF directory")
    parser.add_argument("--prompt-tokens", type=int, default=8192)
    parser.add_argument("--chunk-tokens", type=int, default=2048)
    parser.add_argument("--sizes", default="1,2,4", help="SP sizes, comma-separated")
    parser.add_argument("--kinds", default="ulysses,ring")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-mib", default="16,128", help="KV transfer sizes in MiB")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per CPU worker")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args()

    from dataplane.parallel.groups import connect_store

    num_workers = max(int(s) for s in args.sizes.split(","))
    num_workers = max(num_workers, 2) if args.kv_mib else num_workers
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
    rows: list[tuple[str, int, float, Any]] = []
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
    for proc in procs:
        proc.join()
    _print(rows, args)
    if args.json is not None:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2)
        )
    return 0


def _print(rows: list[tuple[str, int, float, Any]], args: Any) -> None:
    sp: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    for kind, k, prefill, extra in rows:
        if kind not in ("engine", "kv"):
            sp.setdefault((kind, k), []).append((prefill, extra[0], extra[1]))
    print(
        f"\nSP prefill, {args.prompt_tokens} tokens in chunks of {args.chunk_tokens}, "
        f"model {args.model}, device {args.device}; the slowest member counts"
    )
    print(
        "| kind | k | prefill wall s | vs k=1 | busiest member CPU s | vs k=1 | decode ms/token |"
    )
    print("|---|---|---|---|---|---|---|")
    for kind, _k, prefill, _ in rows:
        if kind == "engine":
            print(f"| engine (no SP) | 1 | {prefill:.3f} | | | | |")
    for (kind, k), samples in sorted(sp.items()):
        base = sp.get((kind, 1), samples)
        wall, cpu = max(s[0] for s in samples), max(s[2] for s in samples)
        wall_1, cpu_1 = max(s[0] for s in base), max(s[2] for s in base)
        decode = max(s[1] for s in samples)
        print(
            f"| {kind} | {k} | {wall:.3f} | {wall_1 / wall:.2f}x | {cpu:.3f} | "
            f"{cpu_1 / cpu:.2f}x | {decode * 1e3:.1f} |"
        )
    kv = [r for r in rows if r[0] == "kv"]
    if kv:
        print("\n| KV transfer MiB | s | GB/s |")
        print("|---|---|---|")
        for _, mib, elapsed, _ in kv:
            print(f"| {mib} | {elapsed:.3f} | {(mib << 20) / elapsed / 1e9:.2f} |")


if __name__ == "__main__":
    raise SystemExit(main())
