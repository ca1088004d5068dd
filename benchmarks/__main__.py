"""Run every benchmark, one after another, each in its own process.

    python -m benchmarks                  # all, full size (hours on 2 cores)
    python -m benchmarks --quick          # quick runs only, into scratch files
    python -m benchmarks --only serving,memory

Each benchmark writes its own results (see docs/benchmarks.md); this runner
only sequences them, so that no two share the machine, and says which failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

# name -> (arguments, quick arguments or None where there is no quick run
# that keeps its results out of benchmarks/results/)
BENCHMARKS: dict[str, tuple[list[str], list[str] | None]] = {
    "serving": ([], ["--quick"]),
    "serving-bf16": (["--dtype", "bfloat16"], ["--quick", "--dtype", "bfloat16"]),
    "memory": ([], None),
    "precision": ([], None),
    "perplexity": ([], ["--quick"]),
    "snapshots": ([], None),
    "barge_in": ([], None),
    "eager_prefill": ([], None),
}


def module_of(name: str) -> str:
    return "benchmarks." + ("serving" if name.startswith("serving") else name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}"
    )
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; known: {list(BENCHMARKS)}")
    failed = []
    for name in names:
        full, quick = BENCHMARKS[name]
        if args.quick and quick is None:
            print(f"== {name}: no quick run, skipped")
            continue
        command = [
            sys.executable,
            "-m",
            module_of(name),
            *(quick if args.quick else full),
        ]
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        started = time.perf_counter()
        code = subprocess.call(command)
        print(f"== {name}: exit {code} after {time.perf_counter() - started:.0f} s")
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
