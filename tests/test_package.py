"""The package's shape: the public names, the tutorial's nine files where a learner looks, the role folders, and
imports that form no cycle (so no module needs importlib or a function-level import to load)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import sd

PACKAGE = Path(sd.__file__).parent
TUTORIAL_FILES = ["attention", "clip", "encoder", "decoder", "diffusion", "ddpm", "model_converter", "model_loader",
                  "pipeline"]
PUBLIC = {
    "generate": "sd.pipeline",
    "preload_models_from_standard_weights": "sd.model_loader",
    "save_standard_weights": "sd.model_loader",
    "load_tokenizer": "sd.tokenizer",
    "tokenize": "sd.tokenizer",
    "AttentionMaps": "sd.inspect.attention_maps",
    "LatentPreview": "sd.inspect.preview",
    "NonFiniteError": "sd.checks",
}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name: sd.pipeline, sd.samplers, sd.samplers.ddim, ..."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def module_imports(name: str, path: Path) -> set[str]:
    """The sd modules `name` imports at module level (relative or absolute), as dotted names."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    known, found = modules(), set()
    for node in ast.parse(path.read_text()).body:  # module level only: function-level imports run later
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import samplers` imports the submodule itself
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m for m in found if m in known and m != name}


def test_tutorial_files_sit_at_the_top():
    assert all((PACKAGE / f"{name}.py").is_file() for name in TUTORIAL_FILES)
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == \
        {"samplers", "inspect", "training"}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_names(name):
    assert getattr(sd, name).__module__ == PUBLIC[name]
    assert name in sd.__all__


def test_sampler_names():
    assert list(sd.samplers.SAMPLERS) == ["ddpm", "ddim", "euler", "euler_karras", "euler_a", "heun", "lms",
                                          "dpmpp_2m", "dpmpp_2m_karras"]


def test_no_import_cycles():
    graph = {name: module_imports(name, path) for name, path in modules().items()}
    # A module importing a package's submodule also runs that package's __init__: add those edges.
    for name, deps in graph.items():
        deps |= {".".join(d.split(".")[:k]) for d in list(deps) for k in range(2, d.count(".") + 1)} - {name}
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", "import cycle: " + " -> ".join(trail[trail.index(node):] + [node])
        state[node] = "open"
        for dep in sorted(graph[node]):
            if not name_is_ancestor(dep, node):
                visit(dep, trail + [node])
        state[node] = "done"

    for name in graph:
        visit(name, [])


def name_is_ancestor(package: str, module: str) -> bool:
    """sd.samplers.ddim runs sd.samplers' __init__ first, which is importing it: not a cycle of our making."""
    return module.startswith(package + ".")


def test_no_dynamic_imports():
    """No importlib, no __import__, no globbing at module level: every dependency is a visible import line."""
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imported = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m.split(".")[0] == "importlib" for m in imported), f"{name} imports importlib"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "__import__", f"{name} calls __import__"
        for node in tree.body:
            calls = [c for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)]
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                assert not any(c.func.attr in ("glob", "rglob") for c in calls), f"{name} globs at import"


def test_every_module_imports_on_its_own():
    """Each module, first in a fresh interpreter: an import cycle or a missing import fails here."""
    names = [n for n in modules() if n != "sd.__main__"]
    code = "import importlib, sys\n" + "".join(
        f"[sys.modules.pop(m) for m in list(sys.modules) if m == 'sd' or m.startswith('sd.')]\n"
        f"importlib.import_module({n!r})\n" for n in names)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="module 'sd' has no attribute 'genrate'"):
        sd.genrate


def test_a_ctrl_c_while_torch_loads_waits_until_torch_has_loaded():
    """CI saw a Ctrl-C at start-up abort the process (pybind11: "terminate called after throwing ...
    KeyboardInterrupt", exit -6): it had landed while torch's C++ side was starting. `import sd` holds it back
    until numpy and torch are loaded, then raises it. Here the Ctrl-C comes as torch looks for its C extension."""
    code = (
        "import importlib.abc, signal, sys\n"
        "class CtrlCAsTorchLoads(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'torch._C':\n"
        "            signal.raise_signal(signal.SIGINT)\n"
        "sys.meta_path.insert(0, CtrlCAsTorchLoads())\n"
        "try:\n"
        "    import sd\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', 'torch' in sys.modules and hasattr(sys.modules['torch'], 'nn'))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout == "interrupted True\n", result.stderr
