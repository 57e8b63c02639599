"""The package's layers point one way (docs/design.md, Layers).

Every ``import`` and ``from ... import`` of every module in wam_fast/ (the Triton kernels in
wam_fast.kernels included) is read from its source, at module top and inside functions alike, and checked:
- it does not point up the stack (LAYERS, bottom to top);
- no two modules import each other, directly or through a chain;
- it does not import another module's private (``_name``) names.
``import wam_fast`` / ``from wam_fast import X`` count as imports of the module behind X (the package's
lazy ``_LAZY`` table), so the lazy API cannot hide an upward import. The checker is itself tested on a
small tree made here, with an upward import, a loop and a private name.
"""
from __future__ import annotations

import ast
import os
import sys
import textwrap
from typing import Dict, List, NamedTuple, Optional, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Bottom to top: a module may import its own layer or those below, never above.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("kernels", ("wam_fast.kernels", "wam_fast._C")),  # Triton / CUDA: nothing of wam_fast above them
    ("utils", ("wam_fast", "wam_fast.utils")),  # the root package: only __version__ and the lazy table
    ("ops", ("wam_fast.ops",)),
    ("models", ("wam_fast.configs", "wam_fast.models")),
    ("runtime", ("wam_fast.schedules", "wam_fast.prefix", "wam_fast.sampling", "wam_fast.cache", "wam_fast.quant",
                 "wam_fast.policy", "wam_fast.realtime")),
    ("compiler", ("wam_fast.compiler",)),
    ("pipeline", ("wam_fast.pipeline",)),  # pixels -> actions: frame / text encoders around a WAMPolicy
    ("distill", ("wam_fast.distill",)),
    ("clis", ("wam_fast.bench", "wam_fast.info", "wam_fast.eval", "wam_fast.serve")),
]
# The compiled extension's name is fixed by setup.py; only the ops' registry loads it.
ALLOWED_PRIVATE = {("wam_fast.ops.registry", "wam_fast._C")}


class Import(NamedTuple):
    source: str        # importing module
    target: str        # imported module
    name: Optional[str]  # imported name (from X import name), None for a module
    line: int
    hidden: bool       # inside a function or class body


def module_files(root: str) -> Dict[str, str]:
    """Module name -> file for wam_fast/ under ``root``."""
    out = {}
    for folder, package in (("wam_fast", "wam_fast"),):
        base = os.path.join(root, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for filename in filenames:
                if filename.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, filename), base)[:-3].replace(os.sep, ".")
                    rel = "" if rel == "__init__" else rel.removesuffix(".__init__")
                    out[package + ("." + rel if rel else "")] = os.path.join(dirpath, filename)
    return out


def lazy_table(files: Dict[str, str]) -> Dict[str, str]:
    """The root package's lazy names -> the module each resolves to (from its ``_LAZY`` literal)."""
    tree = ast.parse(open(files["wam_fast"], encoding="utf-8").read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            return {name: module for name, (module, _) in ast.literal_eval(node.value).items()}
    return {}


def _resolve(target: str, name: Optional[str], modules, lazy) -> Tuple[str, Optional[str]]:
    if target == "wam_fast" and name in lazy:
        return lazy[name], None
    if name is not None and f"{target}.{name}" in modules:
        return f"{target}.{name}", None
    while target not in modules and "." in target and target != "wam_fast._C":
        target = target.rpartition(".")[0]  # `import wam_fast.x.y` names a module or its attribute
    return target, name


def imports(files: Dict[str, str]) -> List[Import]:
    """Every in-package import of every module, resolved to the module it reaches."""
    lazy = lazy_table(files)
    found = []
    for module, path in files.items():
        tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
        top = {id(node) for node in tree.body}
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                pairs = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                pairs = [(base, alias.name) for alias in node.names]
            else:
                continue
            for target, name in pairs:
                if target != "wam_fast" and not target.startswith("wam_fast."):
                    continue
                hidden = id(node) not in top
                if isinstance(node, ast.Import) and target == "wam_fast":
                    found += [Import(module, t, None, node.lineno, hidden) for t in _attribute_uses(tree, files, lazy)]
                    continue
                target, name = _resolve(target, name, files, lazy)
                found.append(Import(module, target, name, node.lineno, hidden))
    return found


def _attribute_uses(tree, modules, lazy) -> List[str]:
    """After ``import wam_fast``: the modules its ``wam_fast.<name>...`` attribute uses reach."""
    reached = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain = []
            while isinstance(node, ast.Attribute):
                chain.append(node.attr)
                node = node.value
            if isinstance(node, ast.Name) and node.id == "wam_fast":
                chain.reverse()
                if chain[0] in lazy:
                    reached.add(lazy[chain[0]])
                    continue
                dotted = "wam_fast"
                for part in chain:
                    if dotted + "." + part not in modules:
                        break
                    dotted += "." + part
                reached.add(dotted)
    return sorted(reached)


def layer_of(module: str) -> int:
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    if index is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it to LAYERS")
    return index


def upward(found: List[Import]) -> List[str]:
    return [f"{i.source}:{i.line} imports {i.target} ({LAYERS[layer_of(i.source)][0]} -> "
            f"{LAYERS[layer_of(i.target)][0]}, above it)"
            for i in found if layer_of(i.target) > layer_of(i.source)]


def private(found: List[Import]) -> List[str]:
    bad = []
    for i in found:
        if (i.source, i.target) in ALLOWED_PRIVATE or i.target == i.source:
            continue
        names = [i.name] if i.name else []
        names += [part for part in i.target.split(".") if not i.source.startswith(i.target)]
        for name in names:
            if name.startswith("_") and not name.startswith("__"):
                bad.append(f"{i.source}:{i.line} imports private {name} from {i.target}")
                break
    return bad


def loops(found: List[Import]) -> List[List[str]]:
    """Import cycles: the strongly connected components of two or more modules (Tarjan)."""
    graph: Dict[str, set] = {}
    for i in found:
        if i.target != i.source:
            graph.setdefault(i.source, set()).add(i.target)
            graph.setdefault(i.target, set())
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# ---- the repository ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repo_imports():
    return imports(module_files(ROOT))


def test_every_module_is_in_a_layer():
    for module in module_files(ROOT):
        layer_of(module)


def test_no_import_points_up(repo_imports):
    assert upward(repo_imports) == []


def test_no_import_loops(repo_imports):
    assert loops(repo_imports) == []


def test_no_private_names_from_other_modules(repo_imports):
    assert private(repo_imports) == []


def test_kernels_import_nothing_of_wam_fast_but_kernels(repo_imports):
    assert [i for i in repo_imports if i.source.startswith("wam_fast.kernels")
            and not i.target.startswith("wam_fast.kernels")] == []


# ---- the checker, on a tree made here ----------------------------------------------------------------------------
def _tree(tmp_path, files: Dict[str, str]) -> List[Import]:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return imports(module_files(str(tmp_path)))


CLEAN = {
    "wam_fast/__init__.py": '_LAZY = {"Model": ("wam_fast.models.model", "Model")}\n__version__ = "0"\n',
    "wam_fast/utils/__init__.py": "",
    "wam_fast/utils/checks.py": "def check(): pass\n",
    "wam_fast/ops/__init__.py": "from wam_fast.ops.add import add\n",
    "wam_fast/ops/add.py": "from wam_fast.utils.checks import check\nfrom . import reference\ndef add(): pass\n",
    "wam_fast/ops/reference.py": "def _helper(): pass\ndef add(): return _helper()\n",
    "wam_fast/models/__init__.py": "",
    "wam_fast/models/model.py": "from wam_fast import ops, __version__\nclass Model: pass\n",
    "wam_fast/policy.py": "import wam_fast\ndef make(): return wam_fast.Model()\n",
    "wam_fast/kernels/__init__.py": "",
    "wam_fast/kernels/add.py": "from .row import row\n",
    "wam_fast/kernels/row.py": "def row(): pass\n",
}


def test_checker_passes_a_clean_tree(tmp_path):
    found = _tree(tmp_path, CLEAN)
    assert {(i.source, i.target) for i in found} >= {
        ("wam_fast.ops.add", "wam_fast.ops.reference"), ("wam_fast.models.model", "wam_fast.ops"),
        ("wam_fast.policy", "wam_fast.models.model"), ("wam_fast.kernels.add", "wam_fast.kernels.row")}
    assert upward(found) == [] and loops(found) == [] and private(found) == []


@pytest.mark.parametrize("where", ["top", "function"])
def test_checker_finds_an_upward_import(tmp_path, where):
    line = "from wam_fast.models.model import Model\n"
    text = line if where == "top" else "def add():\n    " + line
    found = _tree(tmp_path, {**CLEAN, "wam_fast/ops/add.py": text})
    assert upward(found) == [f"wam_fast.ops.add:{1 if where == 'top' else 2} imports wam_fast.models.model "
                             f"(ops -> models, above it)"]
    assert found[[i.source for i in found].index("wam_fast.ops.add")].hidden == (where == "function")


def test_checker_sees_through_the_lazy_api(tmp_path):
    found = _tree(tmp_path, {**CLEAN, "wam_fast/utils/checks.py": "import wam_fast\nX = wam_fast.Model\n"})
    assert upward(found) == ["wam_fast.utils.checks:1 imports wam_fast.models.model (utils -> models, above it)"]
    found = _tree(tmp_path, {**CLEAN, "wam_fast/utils/checks.py": "from wam_fast import Model\n"})
    assert len(upward(found)) == 1


def test_checker_finds_a_kernel_importing_wam_fast(tmp_path):
    found = _tree(tmp_path, {**CLEAN, "wam_fast/kernels/row.py": "from wam_fast.utils.checks import check\n"})
    assert upward(found) == ["wam_fast.kernels.row:1 imports wam_fast.utils.checks (kernels -> utils, above it)"]


def test_checker_finds_a_loop(tmp_path):
    found = _tree(tmp_path, {**CLEAN, "wam_fast/ops/reference.py": "def f():\n    from wam_fast.ops import add\n"})
    assert loops(found) == [["wam_fast.ops.add", "wam_fast.ops.reference"]]


def test_checker_finds_a_private_name(tmp_path):
    found = _tree(tmp_path, {**CLEAN, "wam_fast/ops/add.py": "from wam_fast.ops.reference import _helper\n"})
    assert private(found) == ["wam_fast.ops.add:1 imports private _helper from wam_fast.ops.reference"]
    found = _tree(tmp_path, {**CLEAN, "wam_fast/ops/add.py": "import wam_fast._C\n"})
    assert private(found) == ["wam_fast.ops.add:1 imports private _C from wam_fast._C"]


# ---- file sizes and the design document ----------------------------------------------------------------------------
MAX_LINES = 600


def _source_files(*folders, suffixes=(".py",)):
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            yield from (os.path.join(dirpath, f) for f in filenames if f.endswith(suffixes))


def test_no_library_file_is_over_600_lines():
    long = {os.path.relpath(p, ROOT): n for p in _source_files("wam_fast")
            if (n := sum(1 for _ in open(p, encoding="utf-8"))) > MAX_LINES}
    assert long == {}


def test_design_references_name_a_section_of_docs_design():
    """Code points to docs/design.md by section name ("docs/design.md, KV cache"); every such name is a
    section there, and nothing points to a design file the repository does not hold."""
    sections = {line[3:].strip() for line in open(os.path.join(ROOT, "docs", "design.md"), encoding="utf-8")
                if line.startswith("## ")}
    bad = []
    files = list(_source_files("wam_fast", "tests", "benchmarks", "csrc",
                               suffixes=(".py", ".cu", ".h", ".cuh", ".cpp", ".md", ".sh")))
    files = [p for p in files if os.path.basename(p) != "test_layers.py"] + [os.path.join(ROOT, "README.md")]
    for path in files:
        text = open(path, encoding="utf-8").read()
        if "DESIGN" + ".md" in text:
            bad.append(f"{os.path.relpath(path, ROOT)} points to DESIGN.md (not in the repository)")
        for ref in text.split("docs/design.md, ")[1:]:
            if not any(ref.startswith(section) for section in sections):
                bad.append(f"{os.path.relpath(path, ROOT)}: no section of docs/design.md begins {ref[:20]!r}")
    assert bad == []
