"""Streaming perplexity of the sink + window KV cache on a Jane Austen novel.

The novel's tokens are streamed through the worker's own `SinkCache` and
`ModelRunner`, and every token is scored by the negative log-likelihood the
model gave it from the cache it saw. Several cache configurations run side by
side, packed into the same forward passes:

- `dense`: no eviction at all (a cache large enough for the whole text), so
  positions run past the model's trained context;
- `S+W`: S attention sinks and a window of W tokens, re-positioned inside the
  cache the way the worker serves sessions (`0+W` is window only);
- `S+W-norepos`: the same cache, but every key and query keeps its position in
  the original text instead of its slot (a debugging baseline).

Chunks are aligned to the eviction schedule (see `chunk_bounds`), which makes
the result identical to streaming one token at a time through the same cache;
docs/perplexity.md explains why and tests/test_perplexity_bench.py checks it.

    python -m benchmarks.perplexity                     # both novels, 40,000 tokens
    python -m benchmarks.perplexity --text emma --configs dense,4+1020
    python -m benchmarks.perplexity --quick             # smoke run, outputs in /tmp
    python -m benchmarks.perplexity --plot-only         # redraw from saved JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import re
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from worker.model import LoadedModel
from worker.runner import ModelRunner
from worker.sink_cache import CacheShape, Eviction, SinkCache

log = logging.getLogger(__name__)

TEXTS = ("emma", "prideprejudice")
TEXT_TITLES = {"emma": "Emma", "prideprejudice": "Pride and Prejudice"}
CORE_CONFIGS = (
    "dense",
    "0+1024",
    "4+252",
    "4+508",
    "4+1020",
    "1+1020",
    "8+1020",
    "4+1020-norepos",
)
EXTRA_CONFIGS = ("1+252", "1+508", "8+252", "8+508")
QUICK_CONFIGS = ("dense", "0+256", "4+252", "4+252-norepos")
RESULTS_DIR = Path("benchmarks/results")
IGNORE = -100  # cross_entropy's ignore_index: rows with no next token
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class CacheSpec:
    """One cache configuration of the benchmark."""

    name: str
    sink_size: int
    window_size: int | None  # None: dense, the cache holds every token
    reposition: bool = True

    @property
    def dense(self) -> bool:
        return self.window_size is None

    @property
    def label(self) -> str:
        if self.dense:
            return "dense (no eviction)"
        sinks = "sink" if self.sink_size == 1 else "sinks"
        if not self.reposition:
            return f"{self.sink_size} {sinks} + {self.window_size}, no re-positioning"
        if self.sink_size == 0:
            return f"window only ({self.window_size})"
        return f"{self.sink_size} {sinks} + {self.window_size}"

    @classmethod
    def parse(cls, name: str) -> CacheSpec:
        """`dense`, `S+W` or `S+W-norepos`."""
        if name == "dense":
            return cls(name, 0, None)
        match = re.fullmatch(r"(\d+)\+(\d+)(-norepos)?", name)
        if not match:
            raise ValueError(f"config {name!r} is not dense, S+W or S+W-norepos")
        sink, window = int(match[1]), int(match[2])
        if window < 1:
            raise ValueError(f"config {name!r} needs a window of at least one token")
        return cls(name, sink, window, reposition=match[3] is None)


class NoRepositionCache(SinkCache):
    """A sink cache whose tokens keep their position in the original text.

    Slots still shift down on eviction, but `slot_positions` hands out the
    position each token had in the stream, so the query at text position p
    sees its window at p-1, p-2, ... and the sinks at 0..S-1, however far
    apart those are. `_origin[slot]` holds that position for the cached slots
    and, for the free slots after them, the position the next appended tokens
    will take: `write` rotates new keys (and attention rotates new queries)
    before `append` records them.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._origin = torch.arange(self.capacity, device=self.shape.device)
        self._next_position = 0  # text position of the next appended token

    def slot_positions(self, start: int, end: int) -> torch.Tensor:
        return self._origin[start:end]

    def positions(self) -> list[int]:
        return self._origin[: self.length].tolist()

    def append(self, token_ids: list[int], turn_ids: list[int]) -> None:
        super().append(token_ids, turn_ids)
        self._next_position += len(token_ids)
        self._fill_free_slots()

    def truncate(self, length: int) -> None:
        dropped = self.length - length
        super().truncate(length)
        self._next_position -= dropped
        self._fill_free_slots()

    def _evict(self, count: int) -> Eviction | None:
        # The base class moves slots [first + n, length) down to `first`; the
        # positions must move with their keys.
        first, before = self.num_pinned, self.length
        eviction = super()._evict(count)
        if eviction is not None:
            n = eviction.num_evicted
            moved = self._origin[first + n : before].clone()
            self._origin[first : first + moved.numel()] = moved
            self._fill_free_slots()
        return eviction

    def _fill_free_slots(self) -> None:
        free = self.capacity - self.length
        self._origin[self.length :] = torch.arange(
            self._next_position, self._next_position + free, device=self._origin.device
        )


def cache_shape(loaded: LoadedModel) -> CacheShape:
    """The KV geometry of a model, built the way the engine builds it."""
    config = loaded.config
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads
    )
    param = next(loaded.model.parameters())
    return CacheShape(
        config.num_hidden_layers,
        config.num_key_value_heads,
        head_dim,
        param.dtype,
        param.device,
    )


def make_cache(
    spec: CacheSpec, loaded: LoadedModel, evict_size: int, num_tokens: int
) -> SinkCache:
    shape = cache_shape(loaded)
    if spec.dense:
        return SinkCache(shape, loaded.rotary, 0, max(num_tokens, 1), evict_size)
    cls = SinkCache if spec.reposition else NoRepositionCache
    # The engine caps the eviction block at the window the same way.
    evict = min(evict_size, spec.window_size)
    return cls(shape, loaded.rotary, spec.sink_size, spec.window_size, evict)


def chunk_bounds(
    num_tokens: int, cache_size: int, evict_size: int, fill_chunk: int
) -> list[tuple[int, int]]:
    """Chunks that reproduce token-at-a-time streaming exactly.

    Chunks of up to `fill_chunk` tokens fill the cache to exactly
    `cache_size`; after that every chunk is `evict_size` tokens (the last may
    be shorter). Each of those chunks then starts on a full cache, so
    `make_room` evicts exactly one block, the one that the chunk's first token
    would have evicted when fed alone, and token j of the chunk attends to
    the same slots as it would have one token at a time.
    """
    bounds = []
    start = 0
    while start < num_tokens:
        if start < cache_size:
            end = min(start + fill_chunk, cache_size)
        else:
            end = start + evict_size
        end = min(end, num_tokens)
        bounds.append((start, end))
        start = end
    return bounds


@dataclass
class _Stream:
    spec: CacheSpec
    cache: SinkCache
    bounds: list[tuple[int, int]]
    nll: np.ndarray  # [num_text_tokens]; nan where not scored
    step: int = 0

    @property
    def done(self) -> bool:
        return self.step >= len(self.bounds)

    @property
    def streamed(self) -> int:
        return self.bounds[self.step - 1][1] if self.step else 0


def score_streams(
    runner: ModelRunner,
    token_ids: Sequence[int],
    streams: list[_Stream],
    max_batch_tokens: int,
    progress: tqdm | None = None,
) -> None:
    """Advance every stream to its end, packing their chunks into shared passes.

    Streams are independent, so any subset of them can share a forward pass;
    the ones furthest behind go first so that all of them move together.
    """
    while True:
        active = sorted((s for s in streams if not s.done), key=lambda s: s.streamed)
        if not active:
            return
        batch: list[_Stream] = []
        used = 0
        for stream in active:
            start, end = stream.bounds[stream.step]
            if batch and used + end - start > max_batch_tokens:
                break
            batch.append(stream)
            used += end - start
        _score_batch(runner, token_ids, batch)
        if progress is not None:
            progress.update(used)


def _score_batch(
    runner: ModelRunner, token_ids: Sequence[int], batch: list[_Stream]
) -> None:
    work = []
    targets: list[int] = []
    for stream in batch:
        start, end = stream.bounds[stream.step]
        chunk = list(token_ids[start:end])
        work.append((stream.cache, chunk, [0] * len(chunk)))
        # Row i predicts the token after it; the text's last token predicts
        # nothing.
        following = list(token_ids[start + 1 : end + 1])
        targets += following + [IGNORE] * (len(chunk) - len(following))
    logits, _ = runner.forward(work, all_logits=True)  # [T, V]
    target = torch.tensor(targets, device=logits.device)
    nll = F.cross_entropy(logits, target, reduction="none", ignore_index=IGNORE)
    nll = nll.double().cpu().numpy()
    offset = 0
    for stream in batch:
        start, end = stream.bounds[stream.step]
        scored = min(end + 1, len(token_ids)) - (start + 1)
        stream.nll[start + 1 : start + 1 + scored] = nll[offset : offset + scored]
        offset += end - start
        stream.step += 1


def stream_nll(
    loaded: LoadedModel,
    token_ids: Sequence[int],
    specs: Sequence[CacheSpec],
    evict_size: int = 32,
    fill_chunk: int = 256,
    dense_chunk: int = 512,
    dense_tokens: int | None = None,
    max_batch_tokens: int = 2048,
    progress: bool = True,
    progress_position: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Per-token NLL of `token_ids` under each cache configuration.

    Returns {name: nll} with nll[i] the NLL of token i given tokens before it
    as the cache kept them (nan for token 0, and for dense past
    `dense_tokens`), and the wall and CPU seconds spent. Dense caches run in
    their own, larger chunks: their cost grows with the text, and a dense
    chunk of any size is exact because nothing is ever evicted.
    """
    runner = ModelRunner(loaded)
    num_tokens = len(token_ids)
    streams: list[_Stream] = []
    for spec in specs:
        length = (
            min(num_tokens, dense_tokens or num_tokens) if spec.dense else num_tokens
        )
        cache = make_cache(spec, loaded, evict_size, length)
        if spec.dense:
            bounds = chunk_bounds(length, length, evict_size, dense_chunk)
        else:
            bounds = chunk_bounds(
                length, cache.cache_size, cache.evict_size, fill_chunk
            )
        nll = np.full(num_tokens, np.nan)
        streams.append(_Stream(spec, cache, bounds, nll))

    seconds: dict[str, float] = {}
    cpu_began = time.process_time()
    groups = {
        "windowed": [s for s in streams if not s.spec.dense],
        "dense": [s for s in streams if s.spec.dense],
    }
    for group, members in groups.items():
        if not members:
            continue
        total = sum(s.bounds[-1][1] for s in members)
        names = ", ".join(s.spec.name for s in members)
        log.info("streaming %d tokens through %s", total, names)
        bar = tqdm(
            total=total,
            desc=f"{group} ({names})",
            unit="tok",
            disable=not progress,
            position=progress_position,
        )
        began = time.perf_counter()
        score_streams(runner, token_ids, members, max_batch_tokens, bar)
        seconds[group] = time.perf_counter() - began
        bar.close()
        log.info(
            "%s: %.0f s, %.0f tokens/s", group, seconds[group], total / seconds[group]
        )
    seconds["cpu"] = time.process_time() - cpu_began
    # Free the dense cache (gigabytes) before the caller moves on.
    for stream in streams:
        stream.cache = None  # type: ignore[assignment]
    return {s.spec.name: s.nll for s in streams}, seconds


def estimated_cost(spec: CacheSpec, num_tokens: int, dense_tokens: int | None) -> float:
    """Relative CPU cost of streaming one config, for balancing jobs.

    Per token, the model's matmuls cost about as much as attending to 6,000
    keys (measured on SmolLM2-135M); a dense cache attends to half the text on
    average.
    """
    if spec.dense:
        length = min(num_tokens, dense_tokens or num_tokens)
        return length * (1 + length / 2 / 6000)
    return num_tokens * (1 + (spec.sink_size + spec.window_size) / 6000)


def split_jobs(
    specs: Sequence[CacheSpec], num_tokens: int, dense_tokens: int | None, jobs: int
) -> list[list[CacheSpec]]:
    """Longest job first onto the least loaded worker; empty workers dropped."""
    loads = [0.0] * jobs
    groups: list[list[CacheSpec]] = [[] for _ in range(jobs)]
    ranked = sorted(
        specs, key=lambda s: estimated_cost(s, num_tokens, dense_tokens), reverse=True
    )
    for spec in ranked:
        target = loads.index(min(loads))
        groups[target].append(spec)
        loads[target] += estimated_cost(spec, num_tokens, dense_tokens)
    return [g for g in groups if g]


def _job(
    model_path: str,
    max_positions: int,
    threads: int,
    position: int,
    token_ids: list[int],
    specs: list[CacheSpec],
    options: dict[str, Any],
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """One worker process: its own model copy, streaming its share of configs."""
    from worker.model import load_model

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    torch.set_num_threads(threads)
    loaded = load_model(Path(model_path), max_positions=max_positions)
    return stream_nll(loaded, token_ids, specs, progress_position=position, **options)


def stream_nll_in_jobs(
    model_path: Path,
    max_positions: int,
    token_ids: Sequence[int],
    specs: Sequence[CacheSpec],
    jobs: int,
    **options: Any,
) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """`stream_nll` with the configs spread over single-threaded processes.

    On a small shared CPU, separate processes of one thread each keep every
    core busy without the OpenMP barriers that stall a multi-threaded pass
    whenever another program takes a core for a moment.
    """
    groups = split_jobs(specs, len(token_ids), options.get("dense_tokens"), jobs)
    threads = max(1, (os.cpu_count() or 1) // len(groups))
    context = multiprocessing.get_context("spawn")
    nll: dict[str, np.ndarray] = {}
    report = []
    with ProcessPoolExecutor(len(groups), mp_context=context) as pool:
        futures = [
            pool.submit(
                _job,
                str(model_path),
                max_positions,
                threads,
                position,
                list(token_ids),
                group,
                options,
            )
            for position, group in enumerate(groups)
        ]
        for group, future in zip(groups, futures, strict=True):
            values, seconds = future.result()
            nll.update(values)
            report.append(
                {
                    "configs": [s.name for s in group],
                    "threads": threads,
                    **{k: round(v, 1) for k, v in seconds.items()},
                }
            )
    return nll, report


# -- summaries ---------------------------------------------------------------


def range_ppl(nll: np.ndarray, start: int, end: int) -> float | None:
    """exp(mean NLL) over tokens [start, end); None if any was not scored."""
    values = nll[max(start, 1) : end]
    if values.size == 0 or np.isnan(values).any():
        return None
    return float(math.exp(values.mean()))


def report_ranges(num_tokens: int, range_size: int = 8000) -> list[tuple[int, int]]:
    """Consecutive ranges of `range_size` tokens, then the last quarter."""
    edges = list(range(0, num_tokens, range_size)) + [num_tokens]
    ranges = list(zip(edges[:-1], edges[1:], strict=True))
    ranges.append((num_tokens - num_tokens // 4, num_tokens))
    return ranges


def compare_range(num_tokens: int, trained_context: int) -> tuple[int, int]:
    """Where dense is still valid and every windowed cache has long evicted."""
    end = min(trained_context, num_tokens)
    return min(2048, end // 2), end


def summarize(
    text: str,
    nll: dict[str, np.ndarray],
    specs: Sequence[CacheSpec],
    meta: dict[str, Any],
    bin_size: int,
) -> dict[str, Any]:
    """The JSON record of one run: per-bin sums and the report's ranges."""
    num_tokens = meta["num_tokens"]
    starts = list(range(0, num_tokens, bin_size))
    ranges = report_ranges(num_tokens)
    same = compare_range(num_tokens, meta["trained_context"])
    configs = []
    for spec in specs:
        values = nll[spec.name]
        sums, counts, ppls = [], [], []
        for start in starts:
            chunk = values[max(start, 1) : start + bin_size]
            chunk = chunk[~np.isnan(chunk)]
            counts.append(int(chunk.size))
            sums.append(float(chunk.sum()) if chunk.size else None)
            ppls.append(float(math.exp(chunk.mean())) if chunk.size else None)
        configs.append(
            {
                "name": spec.name,
                "label": spec.label,
                "sink_size": spec.sink_size,
                "window_size": spec.window_size,
                "reposition": spec.reposition,
                "tokens_scored": int((~np.isnan(values)).sum()),
                "bins": {"nll_sum": sums, "count": counts, "ppl": ppls},
                "range_ppl": [range_ppl(values, a, b) for a, b in ranges],
                "same_range_ppl": range_ppl(values, *same),
            }
        )
    return {
        "text": text,
        **meta,
        "bin_size": bin_size,
        "bin_starts": starts,
        "ranges": ranges,
        "same_range": list(same),
        "configs": configs,
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def markdown_tables(result: dict[str, Any]) -> str:
    """The report's two tables for one text."""
    ranges = result["ranges"]
    tail = len(ranges) - 1
    by_name = {c["name"]: c for c in result["configs"]}
    dense = by_name.get("dense")
    dense_first = dense["range_ppl"][0] if dense else None
    dense_same = dense["same_range_ppl"] if dense else None
    a0, b0 = ranges[0]
    at, bt = ranges[tail]

    heads = [f"{a:,}–{b:,}" for a, b in ranges]
    heads += [f"{at:,}–{bt:,} ÷ dense {a0:,}–{b0:,}", f"÷ own {a0:,}–{b0:,}"]
    lines = ["| config | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for config in result["configs"]:
        cells = [_fmt(v) for v in config["range_ppl"]]
        first, last = config["range_ppl"][0], config["range_ppl"][tail]
        # Against dense: the claim. Against itself: how much harder the text
        # got, since every config moves with it.
        cells.append(_fmt(_ratio(last, dense_first), 3))
        cells.append(_fmt(_ratio(last, first), 3))
        lines.append(f"| {config['label']} | " + " | ".join(cells) + " |")

    sa, sb = result["same_range"]
    lines += [
        "",
        f"| config | PPL {sa:,}–{sb:,} | ÷ dense, same tokens |",
        "|---|---:|---:|",
    ]
    for config in result["configs"]:
        value = config["same_range_ppl"]
        ratio = _ratio(value, dense_same)
        lines.append(f"| {config['label']} | {_fmt(value)} | {_fmt(ratio, 3)} |")
    return "\n".join(lines)


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


# -- plot and files ----------------------------------------------------------

# (color, line style, width). 1 and 8 sinks land on top of 4 sinks with the
# same window, so they are drawn thin and broken over its thick line.
_STYLE = {
    "dense": ("black", "-", 2.4),
    "0+1024": ("tab:red", "-", 1.6),
    "4+252": ("#9ecae1", "-", 1.6),
    "4+508": ("#4292c6", "-", 1.6),
    "4+1020": ("#08306b", "-", 3.2),
    "1+1020": ("tab:green", "--", 1.2),
    "8+1020": ("tab:orange", ":", 1.6),
    "4+1020-norepos": ("tab:purple", "-", 1.6),
    "1+252": ("tab:green", "--", 1.0),
    "1+508": ("tab:green", "-.", 1.0),
    "8+252": ("tab:orange", ":", 1.0),
    "8+508": ("tab:orange", "-.", 1.0),
}


def plot(results: Sequence[dict[str, Any]], path: Path) -> None:
    """Binned perplexity against tokens streamed: per text, all configs, then
    a zoom on the caches that stay usable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(
        2 * len(results),
        1,
        figsize=(13, 8.5 * len(results)),
        squeeze=False,
        gridspec_kw={"hspace": 0.35},
    )
    for i, result in enumerate(results):
        full, zoom = axes[2 * i, 0], axes[2 * i + 1, 0]
        bin_size = result["bin_size"]
        starts = np.array(result["bin_starts"])
        centers = starts + np.minimum(bin_size, result["num_tokens"] - starts) / 2
        usable = []  # configs that re-position: the zoom's y range
        for config in result["configs"]:
            ppl = np.array([np.nan if v is None else v for v in config["bins"]["ppl"]])
            color, style, width = _STYLE.get(config["name"], (None, "-", 1.4))
            label = config["label"]
            # A dense run cut short says where it stops (token 0 is never
            # scored, so a full run scores one token less than the text).
            scored = config["tokens_scored"]
            if scored < result["num_tokens"] - 1:
                label += f", first {scored:,} tokens"
            for ax in (full, zoom):
                ax.plot(centers, ppl, style, color=color, linewidth=width, label=label)
            if config["window_size"] is not None and config["reposition"]:
                usable.append(ppl)
        title = TEXT_TITLES.get(result["text"], result["text"])
        model = re.sub(r"-[0-9a-f]{12}$", "", result["model"])  # the cache digest
        full.set_title(
            f"{title}: perplexity per {bin_size:,}-token bin, {model}, "
            f"eviction block {result['evict_size']}"
        )
        zoom.set_title(
            f"{title}, zoomed on the caches that re-position "
            "(dense and no re-positioning leave the top)",
            fontsize=10,
        )
        if usable:
            values = np.concatenate(usable)
            zoom.set_ylim(np.nanmin(values) * 0.85, np.nanmax(values) * 1.15)
        context = result["trained_context"]
        for ax in (full, zoom):
            ax.set_yscale("log")
            ax.set_xlim(0, result["num_tokens"])
            ax.set_xlabel("tokens streamed")
            ax.set_ylabel("perplexity (log scale)")
            ax.grid(True, which="both", alpha=0.3)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
            if context < result["num_tokens"]:
                ax.axvline(context, color="grey", linestyle=":", linewidth=1.2)
                ax.text(
                    context,
                    0.02,
                    f" trained context ({context:,})",
                    transform=ax.get_xaxis_transform(),
                    va="bottom",
                    ha="left",
                    fontsize=9,
                    color="dimgrey",
                )
        # Plain numbers on the log axes; on the wide one only 1-2-5 steps,
        # which would otherwise crowd into each other.
        full.yaxis.set_major_formatter(FuncFormatter(_log_label((1, 2, 5))))
        full.yaxis.set_minor_formatter(FuncFormatter(_log_label((2, 5))))
        zoom.yaxis.set_major_formatter(FuncFormatter(_log_label(range(1, 10))))
        zoom.yaxis.set_minor_formatter(FuncFormatter(_log_label(range(1, 10))))
        full.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    log.info("wrote %s", path)


def _log_label(leading: Sequence[int]) -> Any:
    """Label a log-axis tick with its plain value if its leading digit is listed."""
    allowed = set(leading)

    def label(value: float, _: int) -> str:
        if value <= 0:
            return ""
        digit = int(round(value / 10 ** math.floor(math.log10(value))))
        return f"{value:,.0f}" if digit in allowed else ""

    return label


def update_doc(doc: Path, text: str, tables: str) -> None:
    """Replace the generated tables of one text between their markers."""
    begin = f"<!-- perplexity-tables:{text}:begin -->"
    end = f"<!-- perplexity-tables:{text}:end -->"
    if not doc.is_file():
        log.warning("%s is missing; tables not written there", doc)
        return
    content = doc.read_text()
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(content):
        log.warning("%s has no %s markers; tables not written there", doc, begin)
        return
    doc.write_text(pattern.sub(lambda _: f"{begin}\n{tables}\n{end}", content))
    log.info("updated the %s tables in %s", text, doc)


def results_path(results_dir: Path, text: str) -> Path:
    return results_dir / f"perplexity_{text}.json"


# -- command line ------------------------------------------------------------


def _parse_configs(value: str) -> list[CacheSpec]:
    names: list[str] = []
    for item in value.split(","):
        item = item.strip()
        if item == "core":
            names += CORE_CONFIGS
        elif item == "extra":
            names += EXTRA_CONFIGS
        elif item == "all":
            names += CORE_CONFIGS + EXTRA_CONFIGS
        elif item:
            names.append(item)
    unique = list(dict.fromkeys(names))
    return [CacheSpec.parse(name) for name in unique]


def run_text(
    text: str, loaded: LoadedModel, specs: list[CacheSpec], args: argparse.Namespace
) -> dict[str, Any]:
    from services.datasets import austen_text

    body = austen_text(text)
    all_ids = loaded.tokenizer.encode(body, add_special_tokens=False, verbose=False)
    token_ids = all_ids[: args.tokens]
    log.info(
        "%s: %d tokens in the text, streaming %d", text, len(all_ids), len(token_ids)
    )
    options = {
        "evict_size": args.evict_size,
        "fill_chunk": args.fill_chunk,
        "dense_chunk": args.dense_chunk,
        "dense_tokens": args.dense_tokens,
        "max_batch_tokens": args.max_batch_tokens,
    }
    began = time.perf_counter()
    if args.jobs > 1:
        nll, jobs = stream_nll_in_jobs(
            args.model_path, args.max_positions, token_ids, specs, args.jobs, **options
        )
    else:
        nll, seconds = stream_nll(loaded, token_ids, specs, **options)
        jobs = [
            {
                "configs": [s.name for s in specs],
                "threads": torch.get_num_threads(),
                **{k: round(v, 1) for k, v in seconds.items()},
            }
        ]
    wall = time.perf_counter() - began
    meta = {
        "model": loaded.name,
        "model_fingerprint": loaded.fingerprint,
        "text_tokens": len(all_ids),
        "num_tokens": len(token_ids),
        "evict_size": args.evict_size,
        "fill_chunk": args.fill_chunk,
        "dense_chunk": args.dense_chunk,
        "dense_tokens": args.dense_tokens,
        "trained_context": int(loaded.config.max_position_embeddings),
        "runs": [
            {
                "configs": [s.name for s in specs],
                "wall_seconds": round(wall, 1),
                "jobs": jobs,
            }
        ],
    }
    return summarize(text, nll, specs, meta, args.bin_size)


# What must agree for two runs' configs to sit in one table.
_COMPARABLE = ("model_fingerprint", "num_tokens", "evict_size", "bin_size")


def merge_results(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Add a run's configs to the saved ones of the same setup.

    A later run of some configs (say the extra ones) keeps the others; a
    config run again replaces its old numbers. Runs of another setup start
    over.
    """
    if any(old.get(key) != new.get(key) for key in _COMPARABLE):
        log.info("saved results of %s are from another setup; replacing", new["text"])
        return new
    rerun = {c["name"] for c in new["configs"]}
    kept = [c for c in old["configs"] if c["name"] not in rerun]
    order = {name: i for i, name in enumerate(CORE_CONFIGS + EXTRA_CONFIGS)}
    configs = sorted(
        kept + new["configs"], key=lambda c: order.get(c["name"], len(order))
    )
    return {**new, "configs": configs, "runs": old.get("runs", []) + new["runs"]}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.perplexity", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--tokens", type=int, default=None, help="default 40000")
    parser.add_argument("--text", choices=(*TEXTS, "both"), default="both")
    parser.add_argument(
        "--configs",
        default=None,
        help="comma list of dense, S+W, S+W-norepos, or the sets core, extra, all "
        f"(default core: {','.join(CORE_CONFIGS)})",
    )
    parser.add_argument("--out-dir", type=Path, default=None, help="default docs")
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--evict-size", type=int, default=32)
    parser.add_argument("--fill-chunk", type=int, default=256)
    parser.add_argument("--dense-chunk", type=int, default=512)
    parser.add_argument(
        "--dense-tokens",
        type=int,
        default=16384,
        help="stop the dense config after this many tokens, 0 for never: its "
        "cost grows with the square of the text, and by twice the trained "
        "context it has long broken down (default 16384)",
    )
    parser.add_argument("--bin-size", type=int, default=None, help="default 1000")
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="processes to spread the configs over, one thread each when there "
        "are as many as cores (default: the number of cores; 1 runs every "
        "config in this process, packed into shared passes)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of a few configs on 1,536 tokens; outputs go to a "
        "temporary folder unless --out-dir/--results-dir say otherwise",
    )
    parser.add_argument(
        "--replace",
        action="store_true",
        help="drop the saved configs this run does not repeat (by default they "
        "are kept when the model, tokens, eviction block and bins match)",
    )
    parser.add_argument(
        "--plot-only",
        action="store_true",
        help="redraw the plot and tables from the saved JSON, run no model",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)

    scratch = Path(tempfile.gettempdir()) / "sinkserve-perplexity-quick"
    quick = args.quick
    args.tokens = args.tokens or (1536 if quick else 40000)
    args.dense_tokens = args.dense_tokens or None
    args.bin_size = args.bin_size or (128 if quick else 1000)
    args.configs = args.configs or ",".join(QUICK_CONFIGS if quick else CORE_CONFIGS)
    args.out_dir = args.out_dir or (scratch if quick else Path("docs"))
    args.results_dir = args.results_dir or (scratch if quick else RESULTS_DIR)
    texts = TEXTS if args.text == "both" else (args.text,)

    results: dict[str, dict[str, Any]] = {}
    if args.plot_only:
        for text in texts:
            results[text] = json.loads(results_path(args.results_dir, text).read_text())
    else:
        from worker.model import load_model, resolve_model

        specs = _parse_configs(args.configs)
        args.model_path = resolve_model(args.model)
        # Dense and no-re-positioning caches rotate by text position.
        args.max_positions = max(65536, args.tokens)
        loaded = load_model(args.model_path, max_positions=args.max_positions)
        for text in texts:
            result = run_text(text, loaded, specs, args)
            log.info("%s took %.0f s", text, result["runs"][-1]["wall_seconds"])
            path = results_path(args.results_dir, text)
            if path.is_file() and not args.replace:
                result = merge_results(json.loads(path.read_text()), result)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=1) + "\n")
            log.info("wrote %s", path)
            results[text] = result

    # The figure shows every text with saved results, not only this run's.
    shown = []
    for text in TEXTS:
        path = results_path(args.results_dir, text)
        if text in results:
            shown.append(results[text])
        elif path.is_file():
            shown.append(json.loads(path.read_text()))
    plot(shown, args.out_dir / "perplexity.png")
    for text, result in results.items():
        tables = markdown_tables(result)
        update_doc(args.out_dir / "perplexity.md", text, tables)
        print(f"\n{TEXT_TITLES[text]}, {result['num_tokens']:,} tokens:\n\n{tables}\n")


if __name__ == "__main__":
    main()
