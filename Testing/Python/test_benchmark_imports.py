"""Every ``deepreglib`` name a benchmark script imports exists: a restructuring that moves a
module must move the benchmarks' imports with it (pose_range.py and attention_memory.py kept
the old layout's ``deepreglib.methods.learned_init`` and ``deepreglib.networks`` until
2026-12-07). Only the import statements are read; no benchmark is run."""
import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _deepreglib_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deepreglib"):
            for alias in node.names:
                yield node.lineno, node.module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("deepreglib"):
                    yield node.lineno, alias.name, None


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_the_benchmark_imports_only_what_exists(script):
    missing = []
    for line, module, name in _deepreglib_imports(BENCHMARKS / script):
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            missing.append(f"line {line}: {module} ({e})")
            continue
        if name is not None and name != "*" and not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"line {line}: {module}.{name}")
    assert not missing, f"{script} imports what deepreglib does not have: {missing}"
