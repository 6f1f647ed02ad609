"""The generated protobuf code: up to date, and accepted by the installed runtime."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import runtime_version

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ["protocol/venue.proto", "protocol/consumer.proto", "protocol/control.proto"]


def test_generate_script_runs_the_documented_command() -> None:
    script = ROOT / "protocol" / "generate.sh"
    text = script.read_text()
    assert script.stat().st_mode & 0o111
    assert '"${PYTHON:-python}" -m grpc_tools.protoc -I . --python_out=. --pyi_out=.' in text
    assert all(proto in text for proto in PROTOS)


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            *PROTOS,
        ],
        cwd=ROOT,
        check=True,
    )
    for proto in PROTOS:
        for suffix in ("_pb2.py", "_pb2.pyi"):
            name = proto.removesuffix(".proto") + suffix
            fresh = (tmp_path / name).read_text()
            assert (ROOT / name).read_text() == fresh, f"{name} is stale: run protocol/generate.sh"


def test_runtime_accepts_the_gencode_and_the_check_is_live() -> None:
    from protocol import consumer_pb2, control_pb2, venue_pb2

    assert venue_pb2.Envelope.DESCRIPTOR.full_name == "wirekeep.venue.Envelope"
    assert consumer_pb2.ConsumerFrame.DESCRIPTOR.full_name == "wirekeep.consumer.ConsumerFrame"
    assert control_pb2.ControlRequest.DESCRIPTOR.full_name == "wirekeep.control.ControlRequest"
    gencode = (ROOT / "protocol" / "venue_pb2.py").read_text()
    assert "Protobuf Python Version: 7.35.1" in gencode
    public = runtime_version.Domain.PUBLIC
    runtime_version.ValidateProtobufRuntimeVersion(public, 7, 35, 1, "", "venue.proto")
    # a gencode newer than the runtime is refused: the check is real
    newer = runtime_version.OSS_MINOR + 1
    with pytest.raises(runtime_version.VersionError):
        runtime_version.ValidateProtobufRuntimeVersion(public, 7, newer, 0, "", "x.proto")


def test_protocol_imports_nothing_impure() -> None:
    code = (
        "import sys\n"
        "import protocol.framing, protocol.venue_codec, protocol.ws_codec\n"
        "import protocol.consumer_codec, protocol.control_codec\n"
        "bad = {'trio', 'sqlalchemy', 'structlog', 'daemon', 'socket', 'asyncio'}\n"
        "print(sorted(bad & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
