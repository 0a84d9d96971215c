"""Size limits on the code of pipeline/ and jobs/: no block above radon complexity grade C, no
function longer than 60 lines. Each offender is named as path:line.

- Complexity: the blocks `radon cc` reports (functions, methods, classes; a nested function counts
  towards its enclosing one), graded by radon's cc_rank; D (21 and above) or worse fails, so
  `radon cc -s -n D pipeline jobs` lists nothing.
- Length: every `def` (nested ones and methods too), counted from its `def` line to its last line:
  docstring, comments and blank lines inside included, decorators excluded.
"""

import ast
from pathlib import Path

from radon.complexity import cc_rank
from radon.visitors import ComplexityVisitor

ROOT = Path(__file__).parents[2]
PACKAGES = ("pipeline", "jobs")
MAX_LINES = 60
WORST_GRADE = "C"


def _sources() -> dict[str, str]:
    files = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))
    return {p.relative_to(ROOT).as_posix(): p.read_text() for p in files}


SOURCES = _sources()


def test_no_block_is_graded_above_c():
    offenders = [
        f"{path}:{block.lineno} {block.fullname} is graded {cc_rank(block.complexity)} ({block.complexity})"
        for path, code in SOURCES.items()
        for block in ComplexityVisitor.from_code(code).blocks
        if cc_rank(block.complexity) > WORST_GRADE
    ]
    assert not offenders, "\n".join(offenders)


def test_no_function_is_longer_than_60_lines():
    offenders = [
        f"{path}:{node.lineno} {node.name} has {node.end_lineno - node.lineno + 1} lines"
        for path, code in SOURCES.items()
        for node in ast.walk(ast.parse(code))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_LINES
    ]
    assert not offenders, "\n".join(offenders)
