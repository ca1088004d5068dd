"""Serving benchmarks, each row side by side with its baseline in one run.

    python -m benchmarks.serving [--rows 1,2,3,4,5,6] [--quick] [--threads N]

1. Decode time per token against tokens streamed (one session, 4 + 1,020),
   and against the StreamingLLM paper's baseline, a sliding window whose
   keys and values are recomputed for every token, at caches of 256-2,048
   (run by `transformers` as it loads the model, like every baseline).
2. Time to first token by turn on MT-Bench, against re-sending the whole
   history to `transformers` every turn.
3. Aggregate decode throughput against concurrent sessions, against
   `transformers` batched `generate`, its continuous batching
   (`generate_batch`) and, when `llama-cpp-python[server]` is installed,
   llama.cpp's server on the same GGUF file. The `transformers` baselines run
   the model as that library loads it; `generate_batch` also runs with each
   of its linear layers on oneDNN-packed weights (the kernels sinkserve's
   CPU decoder uses), to tell the engine's share from the kernels'.
4. Single-session decode speed against the machine's memory-bandwidth limit.
5. Gateway overhead: per-token latency through the gateway (its own
   process) against straight to the worker, and the gateway's CPU time.
6. Prefill stalls: the longest gap in decoding sessions' tokens while
   another session prefills a long turn, against one chunk's time.

Results go to benchmarks/results/serving.json and docs/serving.png (with
`--dtype bfloat16`: serving-bfloat16.json and .png);
docs/benchmarks.md explains them.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
)

from benchmarks.common import free_port, machine
from protos.sinkserve.v1 import sinkserve_pb2 as pb
from services.client import Conversation
from services.datasets import austen_text, mtbench_questions
from services.embedded import worker_node
from worker.engine import Engine, EngineConfig
from worker.model import (
    LoadedModel,
    can_pack,
    find_smollm2_gguf,
    load_model,
    pack_linears,
    resolve_model,
)
from worker.model import weight_bytes as model_weight_bytes
from worker.runner import ModelRunner
from worker.session import SamplingParams, TokenEvent, TurnEndEvent
from worker.sink_cache import SinkCache

log = logging.getLogger(__name__)
RESULTS = Path(__file__).parent / "results"
STORY = "Tell me a long story about a lighthouse keeper and the sea."


def _sync() -> None:
    """Wait for queued GPU work, so that a timing covers it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs (after one warm-up)."""
    fn()
    samples = []
    for _ in range(repeats):
        _sync()
        started = time.perf_counter()
        fn()
        _sync()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def _stream(runner: ModelRunner, cache: SinkCache, ids: list[int]) -> None:
    """Prefill `ids` in chunks that fit the window."""
    chunk = min(508, cache.window_size // 2)
    for start in range(0, len(ids), chunk):
        piece = ids[start : start + chunk]
        runner.forward([(cache, piece, [1] * len(piece))])


def _decode(runner: ModelRunner, cache: SinkCache, token: list[int]) -> Callable:
    """One decode step of one session (the same token again each time)."""
    return lambda: runner.forward([(cache, token, [1])])


@dataclass
class Library:
    """The model as `transformers` loads it, for the baselines: its own
    weights in their usual layout and the library's attention."""

    model: PreTrainedModel
    tokenizer: object

    @classmethod
    def load(cls, path: Path, dtype: torch.dtype, device: str = "cpu") -> Library:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        model = model.to(device).eval()
        return cls(model, AutoTokenizer.from_pretrained(path))


def _recompute(library: Library, ids: list[int]) -> Callable[[], object]:
    """One token of the paper's baseline: the whole window, no cache."""
    batch = torch.tensor([ids], device=library.model.device)
    return lambda: library.model(batch, use_cache=False, logits_to_keep=1)


class _LibraryAttention:
    """Run a model with the library's own attention inside the block."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.before = model.config._attn_implementation

    def __enter__(self) -> None:
        self.model.set_attn_implementation("sdpa")

    def __exit__(self, *exc: object) -> None:
        self.model.set_attn_implementation(self.before)


# -- row 1 ---------------------------------------------------------------------


@torch.inference_mode()
def row_decode_vs_streamed(
    loaded: LoadedModel,
    library: Library,
    marks: list[int],
    sizes: list[int],
    repeats: int,
) -> dict:
    text = loaded.tokenizer.encode(austen_text("emma"), add_special_tokens=False)
    runner = ModelRunner(loaded)
    shape = Engine(loaded).cache_shape
    cache = SinkCache(shape, loaded.rotary, 4, 1020, evict_size=32)
    # A copy of the cache at every mark, timed round-robin at the end, so
    # that the machine's drift in speed lands on every mark alike.
    at_mark = {}
    fed = 0
    for mark in marks:
        _stream(runner, cache, text[fed:mark])
        fed = mark
        at_mark[mark] = copy.deepcopy(cache, {id(cache.rotary): cache.rotary})
    samples: dict[int, list[float]] = {mark: [] for mark in marks}
    steps = {mark: _decode(runner, at_mark[mark], [text[mark]]) for mark in marks}
    for step in steps.values():
        step()  # warm-up
    for _ in range(repeats):
        for mark, step in steps.items():
            # Decode steps in steady state: every 32nd one evicts a block.
            started = time.perf_counter()
            step()
            samples[mark].append(time.perf_counter() - started)
    by_streamed = {mark: statistics.median(samples[mark]) for mark in marks}
    for mark, seconds in by_streamed.items():
        log.info("row 1: decode after %d tokens: %.1f ms", mark, seconds * 1e3)
    del at_mark, steps

    by_cache = {}
    for size in sizes:
        full = SinkCache(shape, loaded.rotary, 4, size - 4, evict_size=32)
        _stream(runner, full, text[: size + 64])
        token = [text[size + 64]]
        ours = timed(_decode(runner, full, token), repeats)
        recompute = timed(_recompute(library, text[:size]), max(3, repeats // 5))
        by_cache[size] = {
            "ours_s": ours,
            "recompute_s": recompute,
            "speedup": recompute / ours,
        }
        log.info(
            "row 1: cache %d: ours %.1f ms, recompute %.1f ms (%.1fx)",
            size,
            ours * 1e3,
            recompute * 1e3,
            recompute / ours,
        )
    values = list(by_streamed.values())
    return {
        "cache": "4 sinks + 1,020 window, eviction block 32",
        "step_s_by_tokens_streamed": by_streamed,
        "spread": (max(values) - min(values)) / min(values),
        "by_cache_size": by_cache,
    }


# -- row 2 ---------------------------------------------------------------------


@torch.inference_mode()
def row_ttft_by_turn(
    loaded: LoadedModel, library: Library, turns: int, reply_tokens: int
) -> dict:
    """TTFT of turn k: ours (4 + 1,020, history kept in the cache) against
    prefilling the whole chat-templated history, as `generate` would."""
    questions = [t for q in mtbench_questions() for t in q.turns][:turns]
    engine = Engine(loaded)
    session = engine.open_session(None, SamplingParams(max_new_tokens=reply_tokens))
    events: list = []
    session.sink = events.append
    ours, replies = [], []
    for question in questions:
        engine.submit_turn(session.session_id, question)
        while session.busy:
            engine.step()
        end = [e for e in events if isinstance(e, TurnEndEvent)][-1]
        ours.append(end.stats.ttft_ms / 1000)
        replies.append(end.text)
    picks = [k for k in (1, 5, 10, 20) if k <= turns]
    result: dict = {
        "reply_tokens": reply_tokens,
        "history_tokens": {},
        "ours_ttft_s": {},
        "resend_ttft_s": {},
        "speedup": {},
    }
    for k in picks:
        messages = []
        for question, reply in zip(questions[: k - 1], replies, strict=False):
            messages += [
                {"role": "user", "content": question},
                {"role": "assistant", "content": reply},
            ]
        messages.append({"role": "user", "content": questions[k - 1]})
        ids = loaded.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        resend = timed(_recompute(library, ids), 1 if len(ids) > 1000 else 3)
        result["history_tokens"][k] = len(ids)
        result["ours_ttft_s"][k] = ours[k - 1]
        result["resend_ttft_s"][k] = resend
        result["speedup"][k] = resend / ours[k - 1]
        log.info(
            "row 2: turn %d (%d tokens of history): ours %.0f ms, re-send %.0f ms",
            k,
            len(ids),
            ours[k - 1] * 1e3,
            resend * 1e3,
        )
    return result


# -- row 3 ---------------------------------------------------------------------


def _story_prompt(tokenizer: object) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": STORY}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )


def ours_throughput(loaded: LoadedModel, sessions: int, steps: int) -> float:
    """Tokens/s of the engine's decode steps while all sessions generate."""
    engine = Engine(loaded, EngineConfig(max_sessions=max(64, sessions)))
    counts = [0]

    def sink(event: object) -> None:
        if isinstance(event, TokenEvent):
            counts[0] += 1

    for _ in range(sessions):
        # Greedy, like the baselines; the story runs longer than `steps`.
        params = SamplingParams(max_new_tokens=steps + 16)
        session = engine.open_session(None, params)
        session.sink = sink
        engine.submit_turn(session.session_id, STORY)
    # Prefill everyone first (their first tokens), then time full steps only.
    while counts[0] < sessions:
        engine.step()
    seconds, tokens = 0.0, 0
    for _ in range(steps):
        before = counts[0]
        started = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - started
        if counts[0] - before == sessions:
            seconds += elapsed
            tokens += sessions
    return tokens / seconds if seconds else 0.0


@torch.inference_mode()
def hf_throughput(
    model: PreTrainedModel,
    tokenizer: object,
    sessions: int,
    steps: int,
    static: bool = True,
) -> dict:
    """`generate_batch` (continuous batching) and, with `static`, `generate`
    (a static batch): decode tokens/s, from a run of `steps` tokens minus a
    run of 1 token."""
    prompt = _story_prompt(tokenizer)
    ids = torch.tensor([prompt] * sessions, device=model.device)
    out = {}
    with _LibraryAttention(model):

        def generate(n: int) -> None:
            model.generate(
                ids,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )

        if static:
            out["generate"] = _decode_rate(generate, sessions, steps)

    def generate_batch_span(n: int) -> float:
        """Seconds from the first request's start to the last one's end, as
        the manager records them: its own start-up and warm-up (seconds, on
        every call) are left out, as a long-running server would pay them once."""
        config = GenerationConfig(
            max_new_tokens=n, do_sample=False, eos_token_id=-1, pad_token_id=0
        )
        outputs = model.generate_batch(
            [prompt] * sessions, generation_config=config, progress_bar=False
        )
        spans = [o.lifespan for o in outputs.values()]
        return max(end for _, end in spans) - min(start for start, _ in spans)

    # generate_batch picks its own paged attention implementation.
    with _LibraryAttention(model):
        generate_batch_span(2)  # warm-up
        one = generate_batch_span(1)
        many = generate_batch_span(steps + 1)
    out["generate_batch"] = sessions * steps / (many - one)
    return out


def _decode_rate(run: Callable[[int], None], sessions: int, steps: int) -> float:
    run(2)  # warm-up
    one = timed(lambda: run(1), 1)
    many = timed(lambda: run(steps + 1), 1)
    return sessions * steps / max(many - one, 1e-9)


class LlamaCppServer:
    """llama.cpp's server from llama-cpp-python, on the same GGUF file."""

    def __init__(self, threads: int, n_ctx: int, parallel_slots: int):
        self.port = free_port()
        command = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(find_smollm2_gguf()),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            str(n_ctx),
            "--n_threads",
            str(threads),
            "--n_threads_batch",
            str(threads),
            # Queue concurrent requests instead of cancelling the running one.
            "--interrupt_requests",
            "False",
        ]
        self.info = {"command": " ".join(command[1:]), "slots": parallel_slots}
        # llama.cpp logs a lot; a pipe nobody reads would block it.
        self.log = tempfile.NamedTemporaryFile(
            prefix="llama-cpp-server-", suffix=".log"
        )
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT
        )

    def __enter__(self) -> LlamaCppServer:
        import urllib.request

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = Path(self.log.name).read_text(errors="replace")[-2000:]
                raise RuntimeError(f"llama.cpp server exited:\n{tail}")
            try:
                url = f"http://127.0.0.1:{self.port}/v1/models"
                urllib.request.urlopen(url, timeout=1).read()
                return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("llama.cpp server did not start in 120 s")

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()

    def throughput(self, sessions: int, steps: int) -> float:
        """Aggregate tokens/s over `sessions` concurrent streamed requests,
        counted from each request's first token."""
        import urllib.request

        firsts, lasts, counts = [], [], []
        lock = threading.Lock()

        def one() -> None:
            body = json.dumps(
                {
                    "messages": [{"role": "user", "content": STORY}],
                    "max_tokens": steps + 1,
                    "temperature": 0.0,
                    "stream": True,
                }
            ).encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{self.port}/v1/chat/completions",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            stamps = []
            with urllib.request.urlopen(request, timeout=600) as response:
                for line in response:
                    if line.startswith(b"data: {") and b'"content"' in line:
                        stamps.append(time.perf_counter())
            with lock:
                firsts.append(stamps[0])
                lasts.append(stamps[-1])
                counts.append(len(stamps) - 1)

        threads = [threading.Thread(target=one) for _ in range(sessions)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(counts) / (max(lasts) - min(firsts))


def row_throughput(
    loaded: LoadedModel,
    library: Library,
    packed: Library,
    sizes: list[int],
    steps: int,
    threads: int,
) -> dict:
    """Ours against `transformers` as it loads the model, and, to tell the
    engine from the kernels, `generate_batch` on packed weights."""
    result: dict = {"steps": steps, "sessions": sizes}
    ours, generate, cb, cb_packed = {}, {}, {}, {}
    for n in sizes:
        ours[n] = ours_throughput(loaded, n, steps)
        hf = hf_throughput(library.model, library.tokenizer, n, steps)
        generate[n], cb[n] = hf["generate"], hf["generate_batch"]
        cb_packed[n] = hf_throughput(
            packed.model, packed.tokenizer, n, steps, static=False
        )["generate_batch"]
        log.info(
            "row 3: %d sessions: ours %.1f tok/s, generate %.1f, generate_batch "
            "%.1f (on our packed weights %.1f)",
            n,
            ours[n],
            generate[n],
            cb[n],
            cb_packed[n],
        )
    result["ours_tokens_per_s"] = ours
    result["generate_tokens_per_s"] = generate
    result["generate_batch_tokens_per_s"] = cb
    result["generate_batch_packed_tokens_per_s"] = cb_packed
    result["ours_vs_single"] = {n: ours[n] / ours[sizes[0]] for n in sizes}
    result["ours_vs_generate_batch"] = {n: ours[n] / cb[n] for n in sizes}
    result["ours_vs_generate_batch_packed"] = {n: ours[n] / cb_packed[n] for n in sizes}
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        result["llama_cpp"] = "not installed: pip install 'llama-cpp-python[server]'"
        return result
    llama = {}
    with LlamaCppServer(threads, n_ctx=2048, parallel_slots=1) as server:
        result["llama_cpp_server"] = server.info
        server.throughput(1, 8)  # warm-up: its first request sets up buffers
        for n in sizes:
            llama[n] = server.throughput(n, steps)
            log.info("row 3: %d sessions: llama.cpp %.1f tok/s", n, llama[n])
    result["llama_cpp_tokens_per_s"] = llama
    result["ours_vs_llama_cpp"] = {n: ours[n] / llama[n] for n in sizes}
    return result


# -- row 4 ---------------------------------------------------------------------


def row_bandwidth_limit(loaded: LoadedModel, single_step_s: float) -> dict:
    """Tokens/s measured against (read bandwidth / weight bytes per token)."""
    device = next(loaded.model.parameters()).device
    # Far beyond the CPU's caches (512 MiB), or a GPU's (4 GiB).
    size = (4 if device.type == "cuda" else 0.5) * 2**30
    big = torch.ones(int(size) // 4, device=device)
    seconds = timed(lambda: big.sum(), 7)
    bandwidth = big.numel() * 4 / seconds
    # Each weight once, packed or not; a tied embedding is read one row a token.
    weight_bytes = model_weight_bytes(loaded)
    limit = bandwidth / weight_bytes
    measured = 1 / single_step_s
    return {
        "read_bandwidth_bytes_per_s": bandwidth,
        "weight_bytes": weight_bytes,
        "limit_tokens_per_s": limit,
        "measured_tokens_per_s": measured,
        "fraction_of_limit": measured / limit,
    }


# -- row 5 ---------------------------------------------------------------------


async def _token_stamps(address: str, tokens: int) -> list[float]:
    async with grpc.aio.insecure_channel(address) as channel:
        conversation = Conversation(channel)
        await conversation.open(
            sampling=pb.SamplingParams(max_new_tokens=tokens, temperature=0.0)
        )
        stamps = []
        async for message in conversation.ask(STORY):
            if message.WhichOneof("kind") == "token":
                stamps.append(time.perf_counter())
        await conversation.close()
    return stamps


async def _gateway_overhead(loaded: LoadedModel, tokens: int, rounds: int) -> dict:
    engine = Engine(loaded)
    async with worker_node(engine, None) as node:
        port = free_port()
        gateway = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli",
                "--log-level",
                "WARNING",
                "gateway",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--worker",
                node.address,
            ]
        )
        try:
            address = f"127.0.0.1:{port}"
            async with grpc.aio.insecure_channel(address) as channel:
                await asyncio.wait_for(channel.channel_ready(), 60)
            process = psutil.Process(gateway.pid)
            await _token_stamps(address, 4)  # warm-up through both paths
            await _token_stamps(node.address, 4)
            via, direct, relayed, cpu = [], [], 0, 0.0
            for _ in range(rounds):
                before = process.cpu_times()
                stamps = await _token_stamps(address, tokens)
                after = process.cpu_times()
                cpu += (after.user + after.system) - (before.user + before.system)
                relayed += len(stamps)
                via += [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
                stamps = await _token_stamps(node.address, tokens)
                direct += [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        finally:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(30)
    via_ms = statistics.median(via) * 1e3
    direct_ms = statistics.median(direct) * 1e3
    return {
        "tokens_per_round": tokens,
        "rounds": rounds,
        "median_inter_token_ms_via_gateway": via_ms,
        "median_inter_token_ms_direct": direct_ms,
        "mean_inter_token_ms_via_gateway": statistics.mean(via) * 1e3,
        "mean_inter_token_ms_direct": statistics.mean(direct) * 1e3,
        "overhead_ms_per_token": via_ms - direct_ms,
        "gateway_cpu_s_per_1000_tokens": cpu / relayed * 1000,
        "gateway_cpu_ms_per_token": cpu / relayed * 1e3,
    }


# -- row 6 ---------------------------------------------------------------------


def row_prefill_stall(
    loaded: LoadedModel, decoders: int, long_tokens: int, chunk: int
) -> dict:
    """Decoding sessions' token gaps while another session prefills a long turn."""
    config = EngineConfig(
        window_size=4092, max_turn_tokens=long_tokens + 64, prefill_chunk_size=chunk
    )
    engine = Engine(loaded, config)
    stamps: dict[str, list[float]] = {}
    for i in range(decoders):
        session = engine.open_session(None, SamplingParams(max_new_tokens=4000))
        times = stamps.setdefault(session.session_id, [])

        def sink(event: object, times: list[float] = times) -> None:
            if isinstance(event, TokenEvent):
                times.append(time.perf_counter())

        session.sink = sink
        engine.submit_turn(session.session_id, STORY + f" ({i})")
    while min(len(t) for t in stamps.values()) < 8:
        engine.step()
    quiet_from = time.perf_counter()
    for _ in range(8):
        engine.step()
    text_ids = loaded.tokenizer.encode(austen_text("emma"))
    long_text = loaded.tokenizer.decode(text_ids[:long_tokens])
    prefiller = engine.open_session(None, SamplingParams(max_new_tokens=4))
    first = []
    prefiller.sink = lambda e: (
        isinstance(e, TokenEvent) and first.append(time.perf_counter())
    )
    long_from = time.perf_counter()
    engine.submit_turn(prefiller.session_id, long_text)
    while not first:
        engine.step()
    long_to = first[0]

    def gaps(lo: float, hi: float) -> list[float]:
        out = []
        for times in stamps.values():
            inside = [t for t in times if lo <= t <= hi]
            out += [b - a for a, b in zip(inside, inside[1:], strict=False)]
        return out

    quiet = gaps(quiet_from, long_from)
    during = gaps(long_from, long_to)
    # One chunk on its own, for scale: the least a step carrying it can take.
    runner = ModelRunner(loaded)
    ids = text_ids[:chunk]

    def one_chunk() -> None:
        fresh = SinkCache(engine.cache_shape, loaded.rotary, 4, 1020)
        runner.forward([(fresh, ids, [1] * chunk)])

    chunk_s = timed(one_chunk, 3)
    return {
        "decoding_sessions": decoders,
        "long_turn_tokens": long_tokens,
        "prefill_chunk_tokens": chunk,
        "median_gap_s_before": statistics.median(quiet),
        "median_gap_s_during": statistics.median(during),
        "max_gap_s_during": max(during),
        "one_chunk_alone_s": chunk_s,
        "prefill_seconds": long_to - long_from,
        "steps_during": len(during) // decoders,
    }


# -- report --------------------------------------------------------------------


def _by_int(mapping: dict) -> dict[int, object]:
    """JSON turns int keys into strings; give them back, sorted."""
    return {int(k): v for k, v in sorted(mapping.items(), key=lambda kv: int(kv[0]))}


def _label(ax: object, x: str, y: str, title: str) -> None:
    """Log axes (base 2 on x), labels, title and legend of one panel."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.legend(fontsize=8)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (a, b), (c, d) = axes
    row1 = result.get("row1_decode")
    if row1:
        streamed = _by_int(row1["step_s_by_tokens_streamed"])
        marks = list(streamed)
        values = [streamed[k] * 1e3 for k in marks]
        a.plot(marks, values, "o-", label="sinkserve, 4 + 1,020")
        a.set_xscale("log")
        a.set_ylim(0, max(values) * 1.5)
        a.set_xlabel("tokens streamed")
        a.set_ylabel("decode step (ms)")
        a.set_title("Row 1: decode time per token, one session")
        a.legend()
        by = _by_int(row1["by_cache_size"])
        sizes = list(by)
        b.plot(sizes, [by[s]["ours_s"] * 1e3 for s in sizes], "o-", label="sinkserve")
        b.plot(
            sizes,
            [by[s]["recompute_s"] * 1e3 for s in sizes],
            "s-",
            label="sliding window, recompute",
        )
        for s in sizes:
            b.annotate(
                f"{by[s]['speedup']:.0f}x",
                (s, by[s]["recompute_s"] * 1e3),
                xytext=(0, 6),
                textcoords="offset points",
                ha="center",
            )
        title = "Row 1: against the paper's recompute baseline"
        _label(b, "cache size (tokens)", "time per token (ms)", title)
    row2 = result.get("row2_ttft")
    if row2:
        ours, resend = _by_int(row2["ours_ttft_s"]), _by_int(row2["resend_ttft_s"])
        turns = list(ours)
        c.plot(turns, [ours[k] * 1e3 for k in turns], "o-", label="sinkserve")
        c.plot(
            turns,
            [resend[k] * 1e3 for k in turns],
            "s-",
            label="re-send history to transformers",
        )
        _label(c, "MT-Bench turn", "time to first token (ms)", "Row 2: TTFT by turn")
        c.set_xscale("linear")
        c.set_xticks(turns)
    row3 = result.get("row3_throughput")
    if row3:
        sizes = [int(s) for s in row3["sessions"]]
        series = [
            ("ours_tokens_per_s", "sinkserve", "o-"),
            ("generate_tokens_per_s", "transformers generate (static batch)", "s--"),
            ("generate_batch_tokens_per_s", "transformers generate_batch", "^--"),
            (
                "generate_batch_packed_tokens_per_s",
                "generate_batch, oneDNN-packed linears",
                "v-.",
            ),
            ("llama_cpp_tokens_per_s", "llama.cpp server (Q4_1)", "d:"),
        ]
        for key, label, style in series:
            if key in row3:
                values = _by_int(row3[key])
                d.plot(sizes, [values[s] for s in sizes], style, label=label)
        title = "Row 3: throughput against sessions"
        _label(d, "concurrent sessions", "aggregate decode tokens/s", title)
    for ax in axes.flat:
        ax.grid(alpha=0.3, which="both")
        if not ax.has_data():
            ax.axis("off")
    m = result["machine"]
    vector = {True: " (AVX-512)", False: " (AVX2)"}.get(m.get("avx512"), "")
    fig.suptitle(
        f"SmolLM2-135M-Instruct, {result['dtype']}, {m['cpu']}{vector}, "
        f"{m['torch_threads']} threads"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _jsonable(value: object) -> object:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,3,4,5,6")
    parser.add_argument("--quick", action="store_true", help="small sizes, smoke run")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw the figure from the JSON"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("ContinuousBatchingLogger", "services", "worker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    rows = {int(r) for r in args.rows.split(",")}
    quick = args.quick
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    suffix = "" if args.dtype == "float32" else f"-{args.dtype}"
    if device != "cpu":
        suffix = f"-{device}{suffix}"
    name = "serving_quick" if quick else f"serving{suffix}"
    out = args.out or RESULTS / f"{name}.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    # The figure is named after the results it draws: in docs/ for results
    # kept in benchmarks/results/, beside them for results written elsewhere.
    if out.resolve().parent == RESULTS.resolve() and not quick:
        figure = Path("docs") / f"{out.stem}.png"
    else:
        figure = out.with_suffix(".png")
    if args.plot_only:
        plot(previous, figure)
        return
    path = resolve_model("smollm2")
    loaded = load_model(path, getattr(torch, args.dtype), device)
    library = Library.load(path, getattr(torch, args.dtype), device)
    result: dict = {
        **previous,
        "machine": machine(),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized)",
        "dtype": args.dtype,
        "device": device,
    }
    if rows & {1, 4}:
        marks = [1_000, 4_000] if quick else [1_000, 2_000, 4_000, 8_000, 16_000]
        if not quick:
            marks += [32_000, 64_000]
        sizes = [256, 512] if quick else [256, 512, 1024, 2048]
        result["row1_decode"] = row_decode_vs_streamed(
            loaded, library, marks, sizes, 5 if quick else 32
        )
    if 2 in rows:
        result["row2_ttft"] = row_ttft_by_turn(loaded, library, 5 if quick else 20, 128)
    if 3 in rows:
        sizes = [1, 4] if quick else [1, 2, 4, 8, 16, 32]
        packed = Library.load(path, getattr(torch, args.dtype), device)
        if can_pack(packed.model):
            pack_linears(packed.model)
        result["row3_throughput"] = row_throughput(
            loaded, library, packed, sizes, 8 if quick else 32, args.threads
        )
        del packed
    if 4 in rows:
        steps = result["row1_decode"]["step_s_by_tokens_streamed"]
        result["row4_bandwidth"] = row_bandwidth_limit(loaded, min(steps.values()))
    if 5 in rows:
        result["row5_gateway"] = asyncio.run(
            _gateway_overhead(loaded, 16 if quick else 64, 1 if quick else 4)
        )
    if 6 in rows:
        # The chunk size trades the longest stall against prefill time.
        result["row6_prefill_stall"] = {
            chunk: row_prefill_stall(
                loaded, 2 if quick else 4, 600 if quick else 4000, chunk
            )
            for chunk in (64, 256)
        }
    result = _jsonable(result)
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, figure)
    print(json.dumps(result, indent=1))
    print(f"written to {out} and {figure}")


if __name__ == "__main__":
    main()
