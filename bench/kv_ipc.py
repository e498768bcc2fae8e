"""KV transfer over CUDA IPC between two processes on one GPU, against the device copy.

    python3 bench/kv_ipc.py [--model llama-3-8b] [--kv-tokens 1024,32768,131072] [--repeats 5]
        [--json out.json]

A sender process and this process (the receiver) each hold a KV pool shaped like `--model`'s
(bf16; K and V of every layer in one tensor, as the engine's pool). For each size the sender
offers rows [0, n) with `IpcKVSender` and this process copies them into its own pool with
`IpcKVReceiver`, both polled in a loop as the worker loop polls them. The time is the sender's,
from building the offer to reading the receiver's commit: the whole protocol (store round
trips, event wait, copy, commit). One warm-up transfer first (it maps the sender's pool).
Baseline, same run: the same per-layer K/V copies between two tensors inside this process
(`copy_` on one stream, synchronized), the GPU's own copy speed for this layout. Diagnosis
column: the same copies from the sender's mapped pool, outside the protocol. GB/s count KV
bytes once (the copy reads and writes each byte: twice that crosses memory). Medians.

Phases (medians, ms; both processes stamp `time.monotonic`, one clock on one machine): `offer`
the sender builds and stores the offer (no token ids), `seen` until the receiver has read it
(its store polling), `reserve` it parses it and reserves rows (here: views; the engine's
admission is not timed), `enqueue` opens handles and the event and queues the copies, `copy`
until the receiver's poll sees the ids attached and the copies done (`gpu`: the copy as the GPU
timed it), `commit` the receiver's compare_set and finish, `ack` until the sender reads the
result. Overlapped with `copy`: `ids` the sender packs and stores the token ids (after `offer`),
`attach` the receiver unpacks them (here: no engine admission).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

TIMEOUT_S = 120.0


def _pool(model: str, num_tokens: int) -> Any:
    """(L, 2, tokens, Hkv, D) bf16 on cuda:0, random (never time zeros)."""
    import torch

    from dataplane.models.llama import ModelShape
    from dataplane.models.presets import preset_config

    shape = ModelShape.from_config(preset_config(model))
    size = (shape.num_layers, 2, num_tokens, shape.num_kv_heads, shape.head_dim)
    return torch.randn(size, dtype=torch.bfloat16, device="cuda:0")


def _metadata(pool: Any, num_tokens: int, request_id: str) -> Any:
    from dataplane.engine.types import KVMetadata, SamplingParams

    layers, _, _, heads, dim = pool.shape
    return KVMetadata(
        request_id=request_id,
        prompt_token_ids=tuple(range(num_tokens + 1)),
        output_token_ids=(),
        num_kv_tokens=num_tokens,
        num_layers=layers,
        num_kv_heads=heads,
        head_dim=dim,
        dtype=str(pool.dtype),
        sampling=SamplingParams(max_new_tokens=1),
        generator_state=None,
    )


def _sender(port: int, args: Any, jobs: Any, results: Any) -> None:
    import torch

    from dataplane.engine.types import KVExport
    from dataplane.parallel.groups import connect_store
    from dataplane.parallel.kv_ipc import IpcKVSender, IpcRegistry
    from dataplane.parallel.kv_transfer import TransferState

    torch.cuda.set_device(0)
    store = connect_store("127.0.0.1", port, TIMEOUT_S)
    registry = IpcRegistry(torch.device("cuda:0"))
    pool = _pool(args.model, max(_ints(args.kv_tokens)))
    results.put("ready")
    while (job := jobs.get()) is not None:
        key, num_tokens = job
        keys = tuple(pool[layer, 0, :num_tokens] for layer in range(pool.shape[0]))
        values = tuple(pool[layer, 1, :num_tokens] for layer in range(pool.shape[0]))
        export = KVExport(_metadata(pool, num_tokens, key), keys, values)
        torch.cuda.synchronize()
        sender = IpcKVSender(store, key, export, registry, timeout_s=TIMEOUT_S)
        while sender.poll() is TransferState.TRANSFERRING:
            pass
        results.put((sender.state.name, sender.stamps, sender.num_bytes))


def _receive(store: Any, key: str, registry: Any, pool: Any) -> Any:
    from dataplane.engine.types import KVImportTarget
    from dataplane.parallel.kv_ipc import IpcKVReceiver
    from dataplane.parallel.kv_transfer import TransferState

    def reserve(meta: Any, _num_prompt: int, _num_output: int) -> KVImportTarget:
        n = meta.num_kv_tokens
        keys = tuple(pool[layer, 0, :n] for layer in range(pool.shape[0]))
        values = tuple(pool[layer, 1, :n] for layer in range(pool.shape[0]))
        return KVImportTarget(meta.request_id, keys, values)

    def ignore(_arg: Any) -> None:
        return None

    receiver = IpcKVReceiver(
        store, key, registry, reserve, ignore, ignore, ignore, timeout_s=TIMEOUT_S
    )
    while receiver.poll() not in (TransferState.DONE, TransferState.FAILED):
        pass
    return receiver


PHASES = ("offer", "seen", "reserve", "enqueue", "copy", "gpu", "commit", "ack", "ids", "attach")
SPANS = {  # phase: (from, to); "s." the sender's stamps, "r." the receiver's
    "offer": ("s.start", "s.offer_set"),
    "seen": ("s.offer_set", "r.offer_read"),
    "reserve": ("r.offer_read", "r.rows_reserved"),
    "enqueue": ("r.rows_reserved", "r.copy_enqueued"),
    "copy": ("r.copy_enqueued", "r.copy_done"),
    "commit": ("r.copy_done", "r.committed"),
    "ack": ("r.committed", "s.end"),
    "ids": ("s.offer_set", "s.ids_set"),
    "attach": ("r.ids_read", "r.ids_attached"),
}


def _phases(sent: dict[str, float], received: Any) -> dict[str, float]:
    """One transfer's phases in ms from both sides' stamps (see the module docstring)."""
    stamps = {f"s.{k}": v for k, v in sent.items()} | {
        f"r.{k}": v for k, v in received.stamps.items()
    }
    spans = {p: (stamps[b] - stamps[a]) * 1e3 for p, (a, b) in SPANS.items()}
    return spans | {"gpu": received.copy_gpu_s * 1e3}


def _copy_s(src: Any, dst: Any, num_tokens: int, repeats: int) -> float:
    """Median time of the same per-layer K/V copies (`copy_`), synchronized."""
    import torch

    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for layer in range(src.shape[0]):
            for kv in (0, 1):
                dst[layer, kv, :num_tokens].copy_(src[layer, kv, :num_tokens])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--kv-tokens", default="1024,32768,131072")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from dataplane.parallel.groups import connect_store
    from dataplane.parallel.kv_ipc import IpcRegistry

    store = connect_store("127.0.0.1", 0, TIMEOUT_S, is_master=True)
    ctx = mp.get_context("spawn")
    jobs, results = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_sender, args=(store.port, args, jobs, results), daemon=True)
    proc.start()
    assert results.get(timeout=TIMEOUT_S) == "ready"
    largest = max(_ints(args.kv_tokens))
    pool = _pool(args.model, largest)
    registry = IpcRegistry(torch.device("cuda:0"))
    rows = []
    for num_tokens in [min(_ints(args.kv_tokens)), *_ints(args.kv_tokens)]:  # first: warm-up
        times, phases, num_bytes = [], [], 0
        for repeat in range(args.repeats):
            key = f"bench/{num_tokens}/{repeat}/{len(rows)}"
            jobs.put((key, num_tokens))
            receiver = _receive(store, key, registry, pool)
            state, stamps, num_bytes = results.get(timeout=TIMEOUT_S)
            assert state == "DONE" and receiver.failure() is None, (state, receiver.failure())
            times.append(stamps["end"] - stamps["start"])
            phases.append(_phases(stamps, receiver))
        src = _pool(args.model, num_tokens)
        copy_s = _copy_s(src, pool, num_tokens, args.repeats)
        del src
        # Diagnosis: the same copies from the sender's mapped pool, without the protocol
        peer = registry.opened()[0].view(pool.dtype).view(pool.shape)
        ipc_copy_s = _copy_s(peer, pool, num_tokens, args.repeats)
        ipc_s = statistics.median(times)
        rows.append(
            {
                "kv_tokens": num_tokens,
                "gib": num_bytes / 2**30,
                "ipc_s": ipc_s,
                "ipc_gb_s": num_bytes / ipc_s / 1e9,
                "copy_s": copy_s,
                "copy_gb_s": num_bytes / copy_s / 1e9,
                "ratio": copy_s / ipc_s,
                "copy_from_ipc_gb_s": num_bytes / ipc_copy_s / 1e9,
                "phases_ms": {k: statistics.median(p[k] for p in phases) for k in PHASES},
            }
        )
    jobs.put(None)
    proc.join(timeout=30)
    warm_up, rows = rows[0], rows[1:]
    print(f"{args.model} KV, {torch.cuda.get_device_name(0)}, medians of {args.repeats}")
    print(
        "| KV tokens | GiB | IPC transfer s | IPC GB/s | device copy s | copy GB/s | IPC / copy "
        "| copy from mapped pool GB/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['kv_tokens']:,} | {r['gib']:.3f} | {r['ipc_s']:.4f} | {r['ipc_gb_s']:.0f} | "
            f"{r['copy_s']:.4f} | {r['copy_gb_s']:.0f} | {r['ratio']:.0%} | "
            f"{r['copy_from_ipc_gb_s']:.0f} |"
        )
    print(f"\nPhases, ms (medians; the warm-up transfer of {warm_up['kv_tokens']:,} tokens first)")
    print("| KV tokens | " + " | ".join(PHASES) + " |")
    print("|---|" + "---|" * len(PHASES))
    for name, r in [("warm-up", warm_up)] + [(f"{r['kv_tokens']:,}", r) for r in rows]:
        print(f"| {name} | " + " | ".join(f"{r['phases_ms'][k]:.2f}" for k in PHASES) + " |")
    if args.json:
        doc = {"model": args.model, "warm_up": warm_up, "rows": rows}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
