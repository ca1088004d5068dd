"""The command line: flags from the environment, the worker's default id."""

from __future__ import annotations

import socket

import pytest

from services.cli import build_parser
from services.directory import MemoryDirectory
from services.embedded import worker_node
from worker.engine import Engine


def test_every_flag_reads_the_environment_and_the_command_line_wins(monkeypatch):
    monkeypatch.setenv("SINKSERVE_EVICT_SIZE", "16")
    monkeypatch.setenv("SINKSERVE_DRAIN_GRACE_S", "3.5")
    monkeypatch.setenv("SINKSERVE_EVICTION", "turns")
    monkeypatch.setenv("SINKSERVE_WORKER", "127.0.0.1:1")  # a list: not read
    monkeypatch.setenv("SINKSERVE_CACHE_DIR", "")  # empty: not set
    monkeypatch.setenv("SINKSERVE_LOG_JSON", "true")
    worker = build_parser().parse_args(["worker"])
    assert (worker.evict_size, worker.drain_grace_s, worker.eviction) == (
        16,
        3.5,
        "turns",
    )
    assert worker.log_json is True
    assert worker.cache_dir is None
    gateway = build_parser().parse_args(["gateway", "--worker", "127.0.0.1:3"])
    assert gateway.worker == ["127.0.0.1:3"]
    assert build_parser().parse_args(["worker", "--evict-size", "8"]).evict_size == 8


def test_a_bad_value_in_the_environment_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("SINKSERVE_EVICTION", "bogus")
    with pytest.raises(SystemExit, match="SINKSERVE_EVICTION='bogus' is not one of"):
        build_parser()
    monkeypatch.delenv("SINKSERVE_EVICTION")
    monkeypatch.setenv("SINKSERVE_WINDOW_SIZE", "abc")
    with pytest.raises(SystemExit, match="SINKSERVE_WINDOW_SIZE='abc' is not valid"):
        build_parser()


async def test_a_worker_is_known_by_the_address_it_publishes(tiny):
    directory = MemoryDirectory()
    async with worker_node(
        Engine(tiny[0]), directory, advertise="worker-3.example:50052"
    ) as node:
        assert node.servicer.worker_id == "worker-3.example:50052"
    async with worker_node(Engine(tiny[0]), directory, bind="0.0.0.0:0") as node:
        host, _ = node.servicer.worker_id.rsplit(":", 1)
        assert host == socket.gethostname()
