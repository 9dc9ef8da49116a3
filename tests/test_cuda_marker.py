"""Every test that touches CUDA carries the ``cuda`` marker, so that ``python -m pytest -m cuda`` runs all of them
and a CPU run skips them with their reason.

A static check over the tests' source (conftest.py adds the runtime one on GPU machines). A test function touches
CUDA when its body calls ``.cuda()``, reads ``torch.cuda`` beyond ``is_available``/``device_count``, or uses the
device string "cuda" as a device: assigned to a name, as a ``device=`` argument, as the argument of ``.to``,
``torch.device`` or ``torch.Generator``, or in a list (a parametrisation). The marker counts on the function, its
class or the module's ``pytestmark``; a "cuda" parameter counts as marked inside ``pytest.param(..., marks=...cuda)``.
Helpers outside test functions are left to the runtime check.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path
from typing import List

TESTS = Path(__file__).resolve().parent
QUERIES = {"is_available", "device_count"}
DEVICE_CALLS = {"to", "device", "Generator"}


def _is_cuda_marker(node: ast.AST) -> bool:
    """``pytest.mark.cuda`` (possibly called, e.g. with arguments)."""
    node = node.func if isinstance(node, ast.Call) else node
    return isinstance(node, ast.Attribute) and node.attr == "cuda" and ast.unparse(node.value).endswith("mark")


def _marks_cuda(node: ast.AST) -> bool:
    """Whether ``node`` (a decorator list's item, a ``pytestmark`` value or ``marks=`` value) includes the marker."""
    return any(_is_cuda_marker(child) for child in ast.walk(node))


def _is_cuda_string(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.split(":")[0] == "cuda"


def _touches(node: ast.AST, parent: ast.AST) -> bool:
    """Whether ``node`` (with its parent) is one of the module docstring's CUDA touches."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "cuda":
        return True
    if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "torch.cuda" and node.attr not in QUERIES:
        return not (isinstance(parent, ast.Attribute))  # torch.cuda.amp.x is reported once, at its outer name
    if not _is_cuda_string(node):
        return False
    if isinstance(parent, ast.keyword):
        return parent.arg == "device"
    if isinstance(parent, ast.Call):
        name = parent.func.attr if isinstance(parent.func, ast.Attribute) else getattr(parent.func, "id", "")
        return name in DEVICE_CALLS and node in parent.args
    return isinstance(parent, (ast.Assign, ast.AnnAssign, ast.List, ast.Tuple, ast.Set))


def unmarked_cuda_tests(source: str, filename: str = "<source>") -> List[str]:
    """``file:line name`` for each CUDA touch in a test (or in a module-level parametrisation) without the marker."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    module_marked = any(
        isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets)
        and _marks_cuda(node.value)
        for node in tree.body
    )
    found = []
    for node in ast.walk(tree):
        if module_marked or not _touches(node, parents.get(node, tree)):
            continue
        scope, marked, in_function = node, False, False
        while scope in parents:
            scope = parents[scope]
            if isinstance(scope, ast.Call) and ast.unparse(scope.func).endswith("pytest.param"):
                marked |= any(k.arg == "marks" and _marks_cuda(k.value) for k in scope.keywords)
            if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                marked |= any(_marks_cuda(d) for d in scope.decorator_list)
                if not isinstance(scope, ast.ClassDef) and not in_function:
                    in_function, name = True, scope.name
        if in_function and not name.startswith("test"):
            continue  # a helper: the runtime check covers it
        if not marked:
            found.append(f"{filename}:{node.lineno} {name if in_function else '<module>'}")
    return found


def test_the_check_finds_unmarked_cuda_tests():
    source = textwrap.dedent(
        """
        import pytest, torch
        DEVICES = ["cpu", "cuda"]
        MARKED = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
        def test_a(): torch.zeros(1).cuda()
        def test_b(): torch.zeros(1, device="cuda:0")
        def test_c(): device = "cuda"
        def test_d(): torch.cuda.synchronize()
        def test_e(): torch.zeros(1).to("cuda")
        @pytest.mark.cuda
        def test_marked(): torch.zeros(1).cuda(); torch.cuda.synchronize()
        def test_cpu(x="cuda"):
            assert torch.cuda.is_available() or default_dtype("cuda") or torch.zeros(1).to("cpu") is not None
        def _helper(): return torch.zeros(1).cuda()
        @pytest.mark.cuda
        class TestGpu:
            def test_in_class(self): torch.zeros(1).cuda()
        """
    )
    found = unmarked_cuda_tests(source)
    names = sorted(entry.split(" ")[1] for entry in found)
    assert names == ["<module>", "test_a", "test_b", "test_c", "test_d", "test_e"]
    assert unmarked_cuda_tests("import pytest\npytestmark = [pytest.mark.cuda]\ndef test_a(): x.cuda()\n") == []


def test_every_test_that_touches_cuda_has_the_marker():
    found = [
        entry
        for path in sorted(TESTS.glob("test_*.py"))
        for entry in unmarked_cuda_tests(path.read_text(), path.name)
    ]
    assert not found, "tests that touch CUDA without @pytest.mark.cuda: " + ", ".join(found)
