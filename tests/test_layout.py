"""The package's layout: imports point one way, files stay small, README's module map is true.

The import rule (STYLE.md, "A layout that shows the architecture"), lowest first:

    errors  <-  kernels  <-  formats  <-  tensor + ops  <-  the core  <-  lora  <-  train, gradcheck, bench  <-  cli

A module may import from a lower level, or from its own group (the core's
modules use each other; so do tensor and ops, the one cycle tensor.py closes
at its bottom). train, gradcheck and bench share a level but not each other.
`kernels` imports nothing of tinylora's and no third-party package but numpy,
numba and llvmlite. Every import counts, including those inside functions.
"""

import ast
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "tinylora"

# group -> (level, module prefixes); a module's group is its longest matching prefix
GROUPS = {
    "errors": (0, ["tinylora.errors"]),
    "kernels": (1, ["tinylora.kernels"]),
    "formats": (2, ["tinylora.formats"]),
    "engine": (3, ["tinylora.tensor", "tinylora.ops"]),
    "core": (4, ["tinylora.nn", "tinylora.config", "tinylora.model", "tinylora.cache", "tinylora.decode", "tinylora.generate",
                 "tinylora.tokenizer", "tinylora.optim", "tinylora.loading"]),
    "lora": (5, ["tinylora.lora"]),
    "train": (6, ["tinylora.train"]),
    "gradcheck": (6, ["tinylora.gradcheck"]),
    "bench": (6, ["tinylora.bench"]),
    "cli": (7, ["tinylora.cli"]),
}
KERNEL_THIRD_PARTY = {"numpy", "numba", "llvmlite"}
MAX_LINES = 400


def group_of(module: str) -> str | None:
    best = None
    for group, (_, prefixes) in GROUPS.items():
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (group, p)
    return best and best[0]


def module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def imports_of(path: Path, root: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    name = module_name(path, root, package)
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                keep = len(base) - node.level + (1 if is_package else 0)
                if keep < 1:                              # climbs out of the package: a bug in itself
                    found.append((node.lineno, f"<{'.' * node.level}{node.module or ''}: above {package}>"))
                    continue
                target = ".".join(base[:keep] + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((node.lineno, target))
            # `from .ops import elementwise`: the names may be submodules; their group is the same prefix
    return found


def violations(root: Path, package: str = "tinylora") -> list[str]:
    """Every import that points the wrong way, as 'file:line: a (group) imports b (group)'."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        source = module_name(path, root, package)
        rel = path.relative_to(root.parent)
        if source == package:                     # the package root re-exports the public API
            for line, target in imports_of(path, root, package):
                if group_of(target) == "cli":
                    bad.append(f"{rel}:{line}: the package root imports {target} (nothing imports cli)")
            continue
        group = group_of(source)
        if group is None:
            bad.append(f"{rel}: module {source} belongs to no group of the layout (add it to GROUPS)")
            continue
        level = GROUPS[group][0]
        for line, target in imports_of(path, root, package):
            top = target.split(".")[0]
            if target.startswith("<"):
                bad.append(f"{rel}:{line}: relative import {target[1:-1]}")
                continue
            if top != package:
                if group == "kernels" and top not in KERNEL_THIRD_PARTY and top not in sys.stdlib_module_names:
                    bad.append(f"{rel}:{line}: kernels import only numpy, numba and llvmlite, not {target}")
                continue
            if target == package:
                bad.append(f"{rel}:{line}: {source} imports the package root (import the module it needs)")
                continue
            other = group_of(target)
            if other is None:
                bad.append(f"{rel}:{line}: {source} imports {target}, which is not a module of the layout")
            elif other != group and GROUPS[other][0] >= level:
                bad.append(f"{rel}:{line}: {source} ({group}) imports {target} ({other}): imports point "
                           "down the layout only")
    return bad


def test_imports_point_one_way():
    bad = violations(PACKAGE)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("wrong, expected", [
    ("from .lora import LoraConfig\n", "imports tinylora.lora (lora)"),          # the model reaching up to LoRA
    ("from .cli import main\n", "imports tinylora.cli (cli)"),
    ("def f():\n    from .train.trainer import train\n", "imports tinylora.train.trainer (train)"),   # lazy too
    ("from ..lora import LoraConfig\n", "relative import ..lora: above tinylora"),
])
def test_the_import_check_catches_a_wrong_import(tmp_path, wrong, expected):
    # A copy of the real package with one wrong import added to model.py: the check must name it.
    import shutil
    copy = tmp_path / "tinylora"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    model = copy / "model.py"
    model.write_text(model.read_text(encoding="utf-8") + "\n" + wrong, encoding="utf-8")
    bad = violations(copy)
    assert len(bad) == 1 and bad[0].startswith("tinylora/model.py:") and expected in bad[0], bad


def test_the_import_check_catches_a_kernel_importing_a_library(tmp_path):
    import shutil
    copy = tmp_path / "tinylora"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "kernels" / "bad.py").write_text("import scipy\nfrom ..ops import linear\n", encoding="utf-8")
    bad = violations(copy)
    assert any("kernels import only numpy" in b for b in bad) and any("(kernels) imports tinylora.ops" in b
                                                                      for b in bad), bad


def test_no_file_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these by job (STYLE.md §10): {long}"


def test_every_path_in_the_readme_exists():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    paths = set(re.findall(r"`(tinylora/[\w/.]*)`", readme))
    assert len(paths) > 20, "README's module map should name the modules"
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"README names files that do not exist: {missing}"
