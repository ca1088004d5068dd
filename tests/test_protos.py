"""The committed generated code matches the .proto."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ["sinkserve_pb2.py", "sinkserve_pb2_grpc.py"]


def test_generated_code_is_up_to_date(tmp_path):
    pytest.importorskip("grpc_tools")
    proto = Path("protos/sinkserve/v1/sinkserve.proto")
    (tmp_path / proto.parent).mkdir(parents=True)
    shutil.copy(ROOT / proto, tmp_path / proto)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            "--python_out=.",
            "--grpc_python_out=.",
            str(proto),
        ],
        cwd=tmp_path,
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / proto.parent / name).read_text()
        committed = (ROOT / proto.parent / name).read_text()
        assert fresh == committed, f"{name} is stale: run scripts/gen_protos.sh"
