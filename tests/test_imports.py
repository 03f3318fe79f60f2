"""The import structure of sage/ (docs/design.md §1): no import circle, counting imports made
inside functions too, and the loading layer and model files import only the floors below them.
Run: python -m pytest -q tests/test_imports.py"""

import ast
import sys
from pathlib import Path

import pytest

SAGE = Path(__file__).resolve().parents[1] / "sage"


def module_name(path: Path) -> str:
    parts = path.relative_to(SAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """Every module `name` imports (at any depth of its code), as written: `import a.b` -> a.b;
    `from a.b import c` -> a.b.c when that is a sage module, else a.b."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .a import b
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in MODULES else base)
    return out


def sage_imports(name: str) -> set[str]:
    return {m for m in imports(name) if m == "sage" or m.startswith("sage.")} - {name}


def test_every_import_of_a_sage_module_resolves():
    unknown = {(n, m) for n in MODULES for m in sage_imports(n) if m not in MODULES}
    assert not unknown, f"imports of modules that do not exist: {sorted(unknown)}"


def test_no_import_circle():
    graph = {n: sage_imports(n) for n in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = path[path.index(m):] + [m] if m in path else [n, m]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if m not in state:
                visit(m, path + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])


# What each module of the loading layer may import from sage (floors, bottom to top). The model
# files sit right above: config, the key maps and safetensors headers (for from_pretrained),
# checkpoint (one way: it never imports models), kernels, losses and the tokenizer (attached by
# SageModel.from_pretrained) -- never data, training or tools.
FLOORS = {
    "sage.names": set(),
    "sage.safetensors_io": set(),
    "sage.losses": set(),
    "sage.config": {"sage.names"},
    "sage.tokenizer": {"sage.losses", "sage.names"},  # names: Hermes-2's system message
    "sage.checkpoint": {"sage.config", "sage.names", "sage.safetensors_io"},
    "sage.export": {"sage.checkpoint", "sage.config", "sage.names", "sage.safetensors_io"},
}
MODEL_ALLOWED = {"sage.config", "sage.names", "sage.safetensors_io", "sage.checkpoint",
                 "sage.kernels", "sage.losses", "sage.tokenizer"}
THIRD_PARTY_OK = {"torch", "einops", "safetensors", "sentencepiece", "triton", "numpy"}


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_loading_layer_imports_only_lower_floors(name):
    assert sage_imports(name) <= FLOORS[name], sage_imports(name) - FLOORS[name]


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("sage.models")))
def test_model_files_import_torch_config_kernels_losses_checkpoint_only(name):
    for m in imports(name):
        top = m.split(".")[0]
        if top == "sage":
            ok = (m in MODEL_ALLOWED or m.startswith(("sage.models.", "sage.kernels.")))
        else:
            ok = top in sys.stdlib_module_names or top in {"torch", "einops"} or top == "__future__"
        assert ok, f"{name} imports {m}"


def test_third_party_imports_of_the_loading_layer_are_few():
    for name in FLOORS:
        for m in imports(name):
            top = m.split(".")[0]
            assert (top in sys.stdlib_module_names or top in THIRD_PARTY_OK or top == "sage"
                    or top == "__future__"), f"{name} imports {m}"
