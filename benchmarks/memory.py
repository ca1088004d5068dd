"""Constant memory: stream a novel through one session and watch the bytes.

Streams `--tokens` tokens of *Emma* through one session's sink + window cache
(4 sinks + 1,020 window by default) on the real model, in prefill chunks, and
records every 1,000 tokens the process's resident memory and the cache's
bytes. Both must stay flat once the window is full. Also reports the cache's
bytes per token against the theoretical K+V figure.

    python -m benchmarks.memory [--tokens 100000] [--chunk 248]

Writes benchmarks/results/memory.json and the plot docs/memory.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from services.datasets import austen_text
from worker.engine import Engine, EngineConfig
from worker.model import load_model, resolve_model
from worker.runner import ModelRunner
from worker.sink_cache import SinkCache

log = logging.getLogger(__name__)
RESULTS = Path(__file__).parent / "results"


def stream(tokens: int, chunk: int, sink: int, window: int) -> dict:
    loaded = load_model(resolve_model("smollm2"))
    engine = Engine(loaded, EngineConfig(sink_size=sink, window_size=window))
    text_ids = loaded.tokenizer.encode(austen_text("emma"), add_special_tokens=False)
    if len(text_ids) < tokens:
        raise SystemExit(f"Emma has only {len(text_ids)} tokens")
    cache = SinkCache(engine.cache_shape, loaded.rotary, sink, window, evict_size=32)
    runner = ModelRunner(loaded)
    process = psutil.Process()
    rows = []
    fed = 0
    next_mark = 1000
    started = time.perf_counter()
    with tqdm(total=tokens, unit="tok", desc="streaming Emma") as progress:
        while fed < tokens:
            size = min(chunk, tokens - fed)
            runner.forward([(cache, text_ids[fed : fed + size], [1] * size)])
            fed += size
            progress.update(size)
            while fed >= next_mark:
                rows.append(
                    {
                        "tokens": next_mark,
                        "rss_bytes": process.memory_info().rss,
                        "cache_bytes": cache.nbytes(),
                        "cache_length": cache.length,
                    }
                )
                next_mark += 1000
    elapsed = time.perf_counter() - started
    shape = engine.cache_shape
    return {
        "tokens": tokens,
        "chunk": chunk,
        "sink_size": sink,
        "window_size": window,
        "seconds": elapsed,
        "theoretical_bytes_per_token": shape.bytes_per_token(),
        "cache_bytes_per_token": cache.nbytes() / cache.capacity,
        "rows": rows,
    }


def flatness(rows: list[dict], key: str, after_tokens: int) -> float:
    """(max - min) / min of `key` once `after_tokens` have streamed."""
    values = [r[key] for r in rows if r["tokens"] >= after_tokens]
    return (max(values) - min(values)) / min(values)


def plot(result: dict, path: Path) -> None:
    """Resident memory and cache bytes against tokens streamed, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    tokens = [r["tokens"] for r in rows]
    fig, (rss, cache) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    rss_mib = [r["rss_bytes"] / 2**20 for r in rows]
    rss.plot(tokens, rss_mib, color="tab:blue")
    rss.set_ylabel("worker RSS (MiB)")
    rss.set_ylim(0, max(rss_mib) * 1.15)
    allocated = [r["cache_bytes"] / 2**20 for r in rows]
    # The tensors are allocated whole when the cache is made; the slots in
    # use fill up to the cache size and stay there.
    per_token = result["cache_bytes_per_token"] / 2**20
    used = [r["cache_length"] * per_token for r in rows]
    cache.plot(tokens, allocated, color="tab:green", label="allocated")
    cache.plot(tokens, used, "--", color="tab:olive", label="slots in use")
    cache.set_ylabel("cache tensors (MiB)")
    cache.set_ylim(0, max(allocated) * 1.15)
    cache.legend(loc="lower right")
    cache.set_xlabel("tokens streamed")
    capacity = result["sink_size"] + result["window_size"]
    for ax in (rss, cache):
        ax.axvline(capacity, color="grey", linestyle=":", linewidth=1)
        ax.grid(alpha=0.3)
    cache.annotate(
        f"cache full ({capacity} tokens)",
        (capacity, 0),
        xytext=(4, 4),
        textcoords="offset points",
        fontsize=8,
        color="grey",
    )
    fig.suptitle(
        f"One session, {result['sink_size']} sinks + {result['window_size']} "
        f"window, {result['tokens']:,} tokens of Emma (SmolLM2-135M, fp32)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, default=248)
    parser.add_argument("--sink-size", type=int, default=4)
    parser.add_argument("--window-size", type=int, default=1020)
    parser.add_argument("--plot", type=Path, default=Path("docs/memory.png"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    result = stream(args.tokens, args.chunk, args.sink_size, args.window_size)
    # Flat from the point the window is full and the allocator has settled.
    settle = min(5_000, args.tokens // 2)
    result["rss_spread_after_fill"] = flatness(result["rows"], "rss_bytes", settle)
    result["cache_spread_after_fill"] = flatness(result["rows"], "cache_bytes", settle)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "memory.json"
    out.write_text(json.dumps(result, indent=1))
    plot(result, args.plot)
    rows = result["rows"]
    ratio = result["cache_bytes_per_token"] / result["theoretical_bytes_per_token"]
    print(
        f"streamed {args.tokens} tokens in {result['seconds']:.0f} s\n"
        f"RSS {rows[0]['rss_bytes'] / 2**20:.0f} MiB at 1k tokens, "
        f"{rows[-1]['rss_bytes'] / 2**20:.0f} MiB at the end; "
        f"spread after {settle} tokens: {result['rss_spread_after_fill']:.2%}\n"
        f"cache bytes: {rows[-1]['cache_bytes']} (spread "
        f"{result['cache_spread_after_fill']:.2%})\n"
        f"bytes per cached token: {result['cache_bytes_per_token']:.0f} against "
        f"{result['theoretical_bytes_per_token']} theoretical "
        f"({ratio:.2f}x)"
        f"\nwritten to {out} and {args.plot}"
    )


if __name__ == "__main__":
    main()
