"""The pure core (statemachines/, protocol/) reads no clock and does no I/O.

import-linter (run by the test command) forbids the modules; this test forbids the
calls that need no import to reach a clock or a file.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE = [
    p
    for pkg in ("statemachines", "protocol")
    for p in (ROOT / pkg).glob("*.py")
    if not p.name.endswith("_pb2.py")
]
FORBIDDEN_CALLS = {"now", "utcnow", "today", "time", "monotonic", "perf_counter", "open", "sleep"}


@pytest.mark.parametrize("path", PURE, ids=lambda p: p.name)
def test_no_clock_or_io_calls(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            assert name not in FORBIDDEN_CALLS, f"{path.name}:{node.lineno} calls {name}()"
