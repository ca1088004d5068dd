"""Snapshot and restore of a session's KV cache, against prefilling it again.

On the real SmolLM2 model, for sessions of 256, 1,024 and 4,096 cached
tokens, side by side in one run, each repeated (medians reported):

- **snapshot**: `Engine.capture` (copy under the engine lock), `encode_image`
  (header, SHA-256, raw bytes) and `RedisSnapshotStore.put` (chunks written
  aside, manifest switched, the previous generation deleted);
- **restore**: `RedisSnapshotStore.get` (manifest, chunks, length and SHA-256
  checked), `decode_snapshot` (header and tensor checks, keys rotated again)
  and `Engine.adopt_session` on a second engine, the "other worker";
- **prefill**: rebuilding the same cache from its tokens with `ModelRunner`
  forward passes in chunks of 256, what a worker without the snapshot would
  have to do;
- **bytes**: the snapshot's size against the theoretical K+V size, layers x 2
  x KV heads x head dim x bytes per element x tokens.

Each session is filled by one long user turn through the engine (its
default system prompt, then the text), sized so that the cache holds exactly
the target number of tokens. Redis is a private `redis-server` started here
on a free port (or `--redis-url`, under a namespace of its own that is
deleted afterwards).

    python -m benchmarks.snapshots                  # ~22 min on a shared 2-core box
    python -m benchmarks.snapshots --threads 1 --sizes 256 1024 --repeats 3

By default everything runs twice, with 1 and with 2 torch threads: on a
2-core machine shared with other jobs, two OpenMP threads are often
descheduled mid-operation and every parallel region waits for the late one,
which makes small operations several times slower and the times erratic.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import torch

from benchmarks.common import free_port, machine
from services.snapshot_store import DEFAULT_CHUNK_BYTES, RedisSnapshotStore
from worker.engine import Engine, EngineConfig
from worker.metrics import WorkerMetrics
from worker.model import load_model, resolve_model
from worker.runner import ModelRunner
from worker.session import SamplingParams, Session
from worker.sink_cache import SinkCache
from worker.snapshot import decode_snapshot, encode_image

log = logging.getLogger(__name__)

RESULTS_DIR = Path("benchmarks/results")
REPO = Path(__file__).resolve().parents[1]
SIZES = [256, 1024, 4096]
PREFILL_CHUNK = 256
# The window must hold the biggest session whole: no eviction while filling.
CONFIG = EngineConfig(window_size=4092, max_window_size=4092)


# -- the server -------------------------------------------------------------------


@contextmanager
def private_redis() -> Iterator[str]:
    """A throwaway redis-server, no persistence; stopped and removed after."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise SystemExit("redis-server not found; pass --redis-url")
    port = free_port()
    folder = tempfile.mkdtemp(prefix="bench-redis-")
    process = subprocess.Popen(
        [
            executable,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            folder,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


def redis_version(url: str) -> str:
    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


def drop_namespace(url: str, namespace: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


# -- sessions ---------------------------------------------------------------------


def corpus() -> str:
    """Plain English prose from this repository, enough for 4,096 tokens."""
    parts = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    return "\n\n".join(p.read_text() for p in parts if p.is_file())


def text_for(engine: Engine, target: int, source: str) -> str:
    """A user turn that, after the default system prompt, fills `target` slots."""
    chat = engine.chat
    overhead = len(chat.system_tokens(None))

    def total(text: str) -> int:
        return overhead + len(chat.user_tokens(text, True, True))

    while total(source) < target:
        source += "\n\n" + source
    lo, hi = 0, len(source)
    while lo < hi:  # the longest prefix that leaves room to pad
        mid = (lo + hi + 1) // 2
        if total(source[:mid]) <= target - 8:
            lo = mid
        else:
            hi = mid - 1
    text = source[:lo]
    while total(text) < target:
        text += " a"  # one token each
    if total(text) != target:
        raise RuntimeError(f"could not size a turn to {target} tokens")
    return text


def fill_session(engine: Engine, target: int, source: str) -> tuple[Session, float]:
    """A session holding exactly `target` cached tokens, by one long turn."""
    session = engine.open_session(None, SamplingParams(max_new_tokens=1, seed=0))
    text = text_for(engine, target, source)
    started = time.perf_counter()
    engine.submit_turn(session.session_id, text)
    while session.busy:
        engine.step()
    elapsed = time.perf_counter() - started
    if session.cache.length != target:
        raise RuntimeError(f"{session.cache.length} cached tokens, not {target}")
    return session, elapsed


def prefill(engine: Engine, session: Session) -> tuple[dict[str, float], SinkCache]:
    """Rebuild the session's cache from its tokens, as without a snapshot."""
    source = session.cache
    ids, turns = source.token_ids, source.turn_ids
    runner: ModelRunner = engine.runner
    with timed() as elapsed:
        # Allocated inside the timing, as a restore allocates its cache too.
        cache = SinkCache(
            engine.cache_shape,
            engine.loaded.rotary,
            source.sink_size,
            source.window_size,
            source.evict_size,
        )
        for i in range(0, len(ids), PREFILL_CHUNK):
            end = i + PREFILL_CHUNK
            runner.forward([(cache, ids[i:end], turns[i:end])])
    return elapsed, cache


@contextmanager
def timed() -> Iterator[dict[str, float]]:
    """Wall and CPU seconds of the block (CPU: this process, all threads).

    CPU time is the cross-check for a shared machine: other jobs stretch the
    wall time, much less the CPU time (Redis' own CPU is not counted).
    """
    result: dict[str, float] = {}
    wall, cpu = time.perf_counter(), time.process_time()
    yield result
    result["wall"] = time.perf_counter() - wall
    result["cpu"] = time.process_time() - cpu


def summary(samples: list[dict[str, float]]) -> dict[str, Any]:
    walls = [s["wall"] for s in samples]
    return {
        "median": statistics.median(walls),
        "min": min(walls),
        "max": max(walls),
        "cpu_median": statistics.median(s["cpu"] for s in samples),
        "samples": walls,
    }


def same_cache(a: SinkCache, b: SinkCache) -> bool:
    """Bit for bit: tokens, raw and rotated keys, values."""
    n = a.length
    return (
        a.token_ids == b.token_ids
        and a.turn_ids == b.turn_ids
        and torch.equal(a.raw_keys(), b.raw_keys())
        and torch.equal(a.rotated_keys(), b.rotated_keys())
        and torch.equal(a.v[:, :, :n], b.v[:, :, :n])
    )


# -- the benchmark ----------------------------------------------------------------

PHASES = (
    "capture",
    "encode",
    "put",
    "snapshot",
    "get",
    "decode",
    "adopt",
    "restore",
    "prefill",
)


async def measure_size(
    engine: Engine,
    other: Engine,
    store: RedisSnapshotStore,
    tokens: int,
    args: argparse.Namespace,
    source: str,
) -> dict[str, Any]:
    session, fill_s = fill_session(engine, tokens, source)
    sid = session.session_id
    shape = engine.cache_shape
    loaded = engine.loaded
    vocab = loaded.model.get_input_embeddings().num_embeddings
    times: dict[str, list[dict[str, float]]] = {name: [] for name in PHASES}
    blob = b""
    identical = True
    prefill_diff = 0.0
    for repeat in range(args.repeats):
        # Snapshot: what SessionPersistence does after a turn, step by step.
        # From the second repeat on, the put also replaces a generation.
        with timed() as total:
            with timed() as t:
                image = engine.capture(sid)
            times["capture"].append(t)
            with timed() as t:
                blob = encode_image(image, loaded.fingerprint)
            times["encode"].append(t)
            with timed() as t:
                await store.put(sid, blob)
            times["put"].append(t)
        times["snapshot"].append(total)
        del image

        # Restore: what SessionPersistence.restore does on another worker.
        with timed() as total:
            with timed() as t:
                stored = await store.get(sid)
            times["get"].append(t)
            with timed() as t:
                restored = decode_snapshot(
                    stored, loaded.fingerprint, shape, loaded.rotary, vocab
                )
            times["decode"].append(t)
            with timed() as t:
                other.adopt_session(restored)
            times["adopt"].append(t)
        times["restore"].append(total)
        del stored
        identical &= same_cache(restored.cache, session.cache)
        other.close_session(sid)
        del restored

        # Prefill: the same cache from its tokens (fewer repeats: the slow one).
        if repeat < args.prefill_repeats:
            elapsed, rebuilt = prefill(engine, session)
            times["prefill"].append(elapsed)
            diff = (rebuilt.raw_keys() - session.cache.raw_keys()).abs().max().item()
            prefill_diff = max(prefill_diff, diff)
            del rebuilt

    engine.close_session(sid)
    await store.delete(sid)
    theoretical = shape.bytes_per_token() * tokens
    result: dict[str, Any] = {
        "tokens": tokens,
        "fill_turn_s": fill_s,
        "snapshot_bytes": len(blob),
        "theoretical_kv_bytes": theoretical,
        # The payload is exactly k_raw and v; the rest is prefix and header.
        "header_bytes": len(blob) - theoretical,
        "bytes_ratio": len(blob) / theoretical,
        "chunks": -(-len(blob) // store.chunk_bytes),
        "restore_identical": identical,
        "prefill_k_raw_max_abs_diff": prefill_diff,
    }
    for name, samples in times.items():
        result[f"{name}_s"] = summary(samples)
    restore = result["restore_s"]["median"]
    snapshot = result["snapshot_s"]["median"]
    prefill_s = result["prefill_s"]["median"]
    result["prefill_over_restore"] = prefill_s / restore
    result["prefill_over_snapshot_plus_restore"] = prefill_s / (snapshot + restore)
    result["prefill_over_restore_cpu"] = (
        result["prefill_s"]["cpu_median"] / result["restore_s"]["cpu_median"]
    )
    result["snapshot_mb_per_s"] = len(blob) / snapshot / 1e6
    result["restore_mb_per_s"] = len(blob) / restore / 1e6
    log.info(
        "%d tokens: snapshot %.3f s, restore %.3f s, prefill %.3f s (x%.1f), %d B",
        tokens,
        snapshot,
        restore,
        prefill_s,
        result["prefill_over_restore"],
        len(blob),
    )
    return result


async def run_all(args: argparse.Namespace, url: str) -> dict[str, Any]:
    info = machine()
    path = resolve_model("smollm2")
    loaded = load_model(path, torch.float32, "cpu")
    engine = Engine(loaded, CONFIG, WorkerMetrics())
    other = Engine(loaded, CONFIG, WorkerMetrics())  # the worker that restores
    namespace = f"bench-snapshots-{uuid.uuid4().hex[:8]}"
    store = RedisSnapshotStore(url, namespace=namespace, timeout_s=60.0)
    source = corpus()
    shape = engine.cache_shape
    runs = []
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            log.info("torch threads: %d", threads)
            sizes = []
            for tokens in args.sizes:
                sizes.append(
                    await measure_size(engine, other, store, tokens, args, source)
                )
            runs.append({"torch_threads": threads, "sizes": sizes})
    finally:
        await store.close()
        drop_namespace(url, namespace)
    info["loadavg_at_end"] = list(os.getloadavg())
    info["redis"] = redis_version(url)
    return {
        "benchmark": "snapshots",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": info,
        "model": {
            "name": loaded.name,
            "fingerprint": loaded.fingerprint,
            "num_layers": shape.num_layers,
            "num_kv_heads": shape.num_kv_heads,
            "head_dim": shape.head_dim,
            "dtype": str(shape.dtype).removeprefix("torch."),
            "kv_bytes_per_token": shape.bytes_per_token(),
        },
        "settings": {
            "repeats": args.repeats,
            "prefill_repeats": args.prefill_repeats,
            "prefill_chunk": PREFILL_CHUNK,
            "chunk_bytes": DEFAULT_CHUNK_BYTES,
            "sink_size": CONFIG.sink_size,
            "window_size": CONFIG.window_size,
            "redis": "private redis-server" if args.redis_url is None else "given",
        },
        "runs": runs,
    }


def table(run: dict[str, Any]) -> str:
    """A markdown table of docs/snapshots.md: one run (thread count)."""
    rows = [
        "| cached tokens | snapshot bytes | K+V bytes | ratio | snapshot s "
        "(capture / encode / put) | restore s (get / decode / adopt) | prefill s "
        "| prefill / restore | same, CPU time |",
        "|---:|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in run["sizes"]:

        def m(name: str, r: dict[str, Any] = r) -> float:
            return r[f"{name}_s"]["median"]

        rows.append(
            f"| {r['tokens']:,} | {r['snapshot_bytes']:,} "
            f"| {r['theoretical_kv_bytes']:,} | {r['bytes_ratio']:.4f} "
            f"| {m('snapshot'):.3f} ({m('capture'):.3f} / {m('encode'):.3f} / "
            f"{m('put'):.3f}) "
            f"| {m('restore'):.3f} ({m('get'):.3f} / {m('decode'):.3f} / "
            f"{m('adopt'):.4f}) "
            f"| {m('prefill'):.2f} | {r['prefill_over_restore']:.1f} "
            f"| {r['prefill_over_restore_cpu']:.1f} |"
        )
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="torch thread counts, one run each (all sizes)",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="snapshots and restores per size"
    )
    parser.add_argument(
        "--prefill-repeats",
        type=int,
        default=3,
        help="prefills per size (at most --repeats)",
    )
    parser.add_argument(
        "--redis-url",
        default=None,
        help="an existing Redis (default: start a private redis-server)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "snapshots.json")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for name in ("transformers", "httpx", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not 1 <= args.prefill_repeats <= args.repeats:
        raise SystemExit("--prefill-repeats must be in [1, --repeats]")
    if max(args.sizes) > CONFIG.sink_size + CONFIG.window_size:
        raise SystemExit(
            f"sizes must be at most {CONFIG.sink_size + CONFIG.window_size}"
        )
    if args.redis_url is None:
        with private_redis() as url:
            result = asyncio.run(run_all(args, url))
    else:
        result = asyncio.run(run_all(args, args.redis_url))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s", args.output)
    for run_ in result["runs"]:
        print(f"\ntorch threads: {run_['torch_threads']}\n\n{table(run_)}")


if __name__ == "__main__":
    main()
