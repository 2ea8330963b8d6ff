"""Rules of the codebase that a reviewer would otherwise have to remember."""

from __future__ import annotations

import ast

from tests.helpers import REPO

MAX_FUNCTION_LINES = 60


def test_no_function_in_the_library_or_kernels_is_over_60_lines():
    """Long functions do several jobs; split them into named steps (docstring included in the count)."""
    long = []
    for root in ("crformer", "kernels"):
        for path in sorted((REPO / root).rglob("*.py")):
            if path.is_relative_to(REPO / "crformer" / "kernels"):  # the link to kernels/, read once
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
