"""The import contract: each module of framepack_turbo imports only from its own layer or the layers below.

Layers, bottom to top (docs/architecture.md):

    0 basics      errors, constants, files, logs, text, hardware          torch-free
    1 decisions   settings, presets, compat, placement, models.presets, optim.registry, optim.plan   torch-free
    2 core        models, pipeline, distributed
    3 passes      optim (the pass modules)
    4 api         api
    5 front ends  cli, doctor, app, bench, train, the package's __init__

Every import counts, module level or inside a function (a lazy import is still a dependency);
imports under `if TYPE_CHECKING:` do not (they never run). Layers 0-1 must not import torch,
diffusers or transformers at module level. Exit 1 with one line per violation.

    python scripts/check_layers.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "framepack_turbo"
ROOT = Path(__file__).resolve().parents[1] / "src" / PACKAGE

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("basics", ("errors", "constants", "files", "logs", "text", "hardware")),
    ("decisions", ("settings", "presets", "compat", "placement", "models.presets", "optim.registry", "optim.plan")),
    ("core", ("models", "pipeline", "distributed")),
    ("passes", ("optim",)),
    ("api", ("api",)),
    ("front ends", ("cli", "doctor", "app", "bench", "train", "launch", "__init__", "__main__")),
)
TORCH_FREE = ("basics", "decisions")
HEAVY = ("torch", "diffusers", "transformers", "torchao", "numpy")


def layer_of(module: str) -> int:
    """The layer of a dotted name inside the package (the longest matching prefix wins)."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise SystemExit(f"{module}: not in any layer; add it to LAYERS in scripts/check_layers.py")
    return best


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(tree: ast.AST, package_of: str) -> list[tuple[int, str, bool]]:
    """(line, imported dotted name, at module level) for every import that runs."""
    found: list[tuple[int, str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, top)
                continue
            if isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative import: resolve against the importing package
                    anchor = package_of.split(".")[: len(package_of.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found.extend(
                    (child.lineno, f"{base}.{alias.name}" if base else alias.name, top) for alias in child.names
                )
            inner_top = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner_top)

    visit(tree, True)
    return found


def violations() -> list[str]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        name = _module_name(path)
        package_of = f"{PACKAGE}.{name}" if path.name != "__init__.py" else f"{PACKAGE}.{name}.__init__"
        own = layer_of(name)
        tree = ast.parse(path.read_text(), str(path))
        for line, target, top in imports(tree, package_of):
            root = target.split(".")[0]
            if root == PACKAGE:
                inner = target.removeprefix(PACKAGE + ".")
                if inner == PACKAGE:
                    continue
                # `from framepack_turbo.optim import offload` names a module; `from x import Name` a symbol
                # (`from framepack_turbo import __version__` names the package's own __init__)
                other = layer_of(inner) if _resolves(inner) else layer_of(inner.rpartition(".")[0] or "__init__")
                if other > own:
                    out.append(
                        f"{path.relative_to(ROOT.parent)}:{line}: {name} ({LAYERS[own][0]}) imports "
                        f"{inner} ({LAYERS[other][0]}), a layer above it"
                    )
            elif top and root in HEAVY and LAYERS[own][0] in TORCH_FREE:
                out.append(
                    f"{path.relative_to(ROOT.parent)}:{line}: {name} ({LAYERS[own][0]}) imports {root} at "
                    "module level; this layer stays torch-free"
                )
    return out


def _resolves(inner: str) -> bool:
    path = ROOT.joinpath(*inner.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def main() -> int:
    found = violations()
    for line in found:
        print(line)
    if found:
        print(f"{len(found)} import(s) against the layers (scripts/check_layers.py says which layer is which)")
        return 1
    print("import layers: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
