"""The package's import direction (docs/architecture.md, "What may import what"), read from the
source with `ast`: every `import` of our own modules, including those inside functions, must go
from a layer to one it is allowed to use, and no chain of imports may come back to where it began.
"""

from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[2]
# Source folders and the package names they are installed under (pyproject.toml's package-dir).
ROOTS = {"fastlora_jax": "fastlora_jax", "kernels": "fastlora_jax.kernels",
         "converters": "fastlora_jax.converters"}

# layer -> the modules in it (a module belongs to the layer of its longest matching prefix).
LAYERS = {
    "errors": ("fastlora_jax.errors",),
    "config": ("fastlora_jax.config",),
    "quant": ("fastlora_jax.quant",),
    "dispatch_tables": ("fastlora_jax.ops.impl", "fastlora_jax.ops.defaults"),
    "kernels": ("fastlora_jax.kernels",),
    "ops": ("fastlora_jax.ops",),
    "models": ("fastlora_jax.models",),
    "lora": ("fastlora_jax.lora",),
    "sharding": ("fastlora_jax.sharding",),
    "converters": ("fastlora_jax.converters",),
    "generation": ("fastlora_jax.generation",),
    "model_object": ("fastlora_jax.models.causal_lm",),
    "vision": ("fastlora_jax.vision",),
    "train": ("fastlora_jax.train",),
    "entry": ("fastlora_jax.api", "fastlora_jax.cli", "fastlora_jax.rl_cli", "fastlora_jax.chat",
              "fastlora_jax.model_flags",
              "fastlora_jax.demo", "fastlora_jax.demo_grpo", "fastlora_jax.testing"),
}
# layer -> the layers it may import (its own always included). `entry` (and the package's
# __init__, which re-exports the public names) may import anything.
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "quant": {"errors"},
    "dispatch_tables": {"errors", "quant"},
    "kernels": {"errors", "quant", "dispatch_tables"},
    "ops": {"errors", "quant", "dispatch_tables", "kernels"},
    "models": {"errors", "config", "quant", "dispatch_tables", "ops"},
    "lora": {"errors", "config", "quant", "dispatch_tables", "ops", "models"},
    "sharding": {"errors", "config", "quant", "dispatch_tables", "ops", "models"},
    "converters": {"errors", "config", "quant", "models", "lora"},
    "generation": {"errors", "config", "quant", "dispatch_tables", "ops", "models", "lora"},
    "model_object": {"errors", "config", "quant", "dispatch_tables", "ops", "models", "lora", "converters",
                     "generation"},
    "vision": {"errors", "config", "quant", "dispatch_tables", "ops", "models", "lora",
               "sharding", "converters", "generation", "model_object"},
    "train": {"errors", "config", "quant", "dispatch_tables", "ops", "models", "lora", "sharding",
              "converters", "generation", "model_object", "vision"},
    "entry": set(LAYERS),
}


def modules() -> dict[str, pathlib.Path]:
    """{dotted module name: file} of every source file of the package."""
    out = {}
    for folder, package in ROOTS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Our modules that `name` imports anywhere in its file (`from pkg import mod` -> pkg.mod)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` blocks never run: drop them first
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING",
                                                                    "typing.TYPE_CHECKING"):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != name}


def layer_of(name: str) -> str | None:
    best = None
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (
                    best is None or len(prefix) > len(best[1])):
                best = (layer, prefix)
    return best[0] if best else None


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_layer():
    missing = sorted(m for m in modules() if m != "fastlora_jax" and layer_of(m) is None)
    assert not missing, f"modules without a layer (add them to LAYERS / ALLOWED): {missing}"


def test_imports_follow_the_layers():
    bad = []
    for name, targets in graph().items():
        if name == "fastlora_jax":  # the package __init__ re-exports the public API
            continue
        layer = layer_of(name)
        for target in sorted(targets):
            if target == "fastlora_jax":  # the public API: for entry points, as for users
                if layer != "entry":
                    bad.append(f"{name} imports the package root (import the defining module)")
                continue
            other = layer_of(target)
            if other != layer and other not in ALLOWED[layer]:
                bad.append(f"{name} ({layer}) imports {target} ({other})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_violation(tmp_path):
    """The reader resolves `from pkg import module` and imports inside functions."""
    src = tmp_path / "mod.py"
    src.write_text("def f():\n    from fastlora_jax import train\n    import fastlora_jax.ops.linear\n")
    known = {"fastlora_jax.train", "fastlora_jax.ops.linear", "fastlora_jax.kernels.x"}
    assert imports("fastlora_jax.kernels.x", src, known) == {"fastlora_jax.train",
                                                             "fastlora_jax.ops.linear"}
    assert layer_of("fastlora_jax.models.causal_lm") == "model_object"
    assert layer_of("fastlora_jax.models.decoder") == "models"
    assert layer_of("fastlora_jax.ops.impl") == "dispatch_tables"
    assert layer_of("fastlora_jax.ops.linear") == "ops"
    assert "train" not in ALLOWED[layer_of("fastlora_jax.kernels.x")]
