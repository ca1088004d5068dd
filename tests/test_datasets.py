"""Tests of the fetched-and-cached public inputs in services.datasets."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, NoReturn

import pytest

from services import datasets
from services.datasets import (
    MTBenchQuestion,
    austen_text,
    default_cache_dir,
    mtbench_questions,
)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache per module, so each input is downloaded once for all tests."""
    return tmp_path_factory.mktemp("sinkserve-cache")


def _no_subprocess(*args: Any, **kwargs: Any) -> NoReturn:
    raise AssertionError(f"cache miss: tried to run {args!r}")


@pytest.mark.network
def test_mtbench_questions_shape(cache_root: Path) -> None:
    questions = mtbench_questions(cache_dir=cache_root)

    assert len(questions) == 80
    assert all(isinstance(q, MTBenchQuestion) for q in questions)
    assert len({q.question_id for q in questions}) == 80
    for question in questions:
        assert len(question.turns) == 2
        assert all(turn.strip() for turn in question.turns)
        assert question.category
    assert (cache_root / "datasets" / "mtbench_question.jsonl").is_file()


@pytest.mark.network
def test_mtbench_second_call_reads_cache(
    cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = mtbench_questions(cache_dir=cache_root)
    monkeypatch.setattr(subprocess, "run", _no_subprocess)

    assert mtbench_questions(cache_dir=cache_root) == first


@pytest.mark.network
def test_emma_text(cache_root: Path) -> None:
    text = austen_text("emma", cache_dir=cache_root)

    assert text.splitlines()[0] == "EMMA"
    assert len(text.split()) > 150_000


@pytest.mark.network
def test_pride_and_prejudice_text(cache_root: Path) -> None:
    text = austen_text("prideprejudice", cache_dir=cache_root)

    assert text.splitlines()[0] == "PRIDE AND PREJUDICE"
    assert len(text.split()) > 100_000
    assert austen_text("pride_and_prejudice", cache_dir=cache_root) == text


@pytest.mark.network
def test_austen_second_call_reads_cache(
    cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = austen_text("emma", cache_dir=cache_root)
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    # Decoding needs rdata; a cache hit must not even import it.
    monkeypatch.setattr(datasets, "_unserialize", _no_subprocess)

    assert austen_text("emma", cache_dir=cache_root) == first
    assert austen_text("prideprejudice", cache_dir=cache_root).startswith(
        "PRIDE AND PREJUDICE"
    )


def test_unknown_title_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pride_and_prejudice"):
        austen_text("persuasion", cache_dir=tmp_path)
    assert not (tmp_path / "datasets").exists()


def test_default_cache_dir_honours_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SINKSERVE_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path

    monkeypatch.delenv("SINKSERVE_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "sinkserve"


def test_failed_command_names_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(args[0], 100, "", "E: no such package")

    monkeypatch.setattr(subprocess, "run", fail)
    with pytest.raises(RuntimeError, match="apt-get download r-cran-janeaustenr"):
        datasets._fetch_austen_texts(["emma"])
