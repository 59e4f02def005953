"""The code's shape, checked: imports only run down the layers, no function in bake/ is over 80
lines, and no module shadows a builtin or a dependency."""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

BAKE = Path(__file__).resolve().parents[1] / "bake"

# low → high; a module may import its own layer and those below (packages: every module inside)
LAYERS = [
    {"bake", "bake.errors", "bake.typed", "bake.options", "bake.store", "bake.maps", "bake.spec", "bake.algebra"},
    {"bake.templates", "bake.modules", "bake.spec_summary", "bake.sampling", "bake.llama_logs"},
    {"bake.models"},
    {"bake.families"},
    {"bake.plan", "bake.runtime"},
    {"bake.passes"},
    {"bake.exporters", "bake.ort_session", "bake.guard"},
    {"bake.ort", "bake.llamacpp", "bake.artifacts", "bake.yardstick", "bake.greedy"},
    {"bake.verify", "bake.verify_pipeline", "bake.verify_gguf"},
    {"bake.modality"},
    {"bake.diff", "bake.diff_report", "bake.evaluation", "bake.fit", "bake.sources"},
    {"bake.compiler", "bake.support_table", "bake.search"},
    {"bake.cli", "bake.__main__"},
]


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(BAKE.rglob("*.py")):
        name = ".".join(p.relative_to(BAKE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def layer(name: str) -> int:
    for i, group in enumerate(LAYERS):
        if any(name == g or (g != "bake" and name.startswith(g + ".")) for g in group):
            return i
    raise AssertionError(f"{name}: not in any layer of tests/test_layers.py (add it where it belongs)")


def imports(name: str, path: Path, known: dict) -> set[str]:
    """Every bake module `name` imports, at module level or inside a function."""
    out = set()
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or "" if node.level == 0 else ".".join(
                pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in known else base)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m == "bake" or m.startswith("bake.")}


def test_imports_run_down_the_layers():
    known = modules()
    up = [f"{name} (layer {layer(name)}) imports {dep} (layer {layer(dep)})"
          for name, path in known.items() for dep in sorted(imports(name, path, known)) if layer(dep) > layer(name)]
    assert not up, "\n".join(up)


def test_no_function_over_80_lines():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, "\n".join(long)


def test_no_module_shadows_a_builtin_or_dependency():
    shadowed = set(dir(builtins)) | {"onnx", "safetensors", "torch", "transformers", "diffusers", "gguf", "peft",
                                     "inspect", "compile", "eval", "json", "types", "typing"}
    bad = [name for name in modules() if name.rsplit(".", 1)[-1] in shadowed]
    assert not bad, bad
