"""The tree reads as the architecture: only the integration wing imports vLLM."""
from __future__ import annotations

import ast
from pathlib import Path

import mikv_vllm

PACKAGE = Path(mikv_vllm.__file__).parent
WING = PACKAGE / "integration"
ENTRY_POINT = PACKAGE / "plugin.py"


def _imports_vllm(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                 else [])
        if any(n == "vllm" or n.startswith("vllm.") for n in names):
            return True
    return False


def test_only_the_wing_imports_vllm():
    outside = [str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py"))
               if WING not in p.parents and p != ENTRY_POINT and _imports_vllm(p)]
    assert outside == [], f"modules outside mikv_vllm/integration import vLLM: {outside}"


def test_the_wing_does_import_vllm():
    """The check above can fail: the wing's modules are seen importing vLLM."""
    assert _imports_vllm(WING / "patches.py") and _imports_vllm(WING / "protocol.py")
