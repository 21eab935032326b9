"""The README's "Layout" is the package map: every path it lists exists, every top-level package and
script of the repository is listed, and a package whose files it lists has all its modules listed.
eval/__main__.py's EVALS is the one registry of eval CLIs: it names every eval module with a main()."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_tree(readme: str) -> list[str]:
    """The paths of the Layout's text block: top-level entries at column 0, a package's entries indented
    two spaces below it."""
    block = re.search(r"## Layout\n.*?```text\n(.*?)```", readme, re.S)
    assert block, "README.md has no ```text block under ## Layout"
    paths, parent = [], ""
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        name = line.split()[0]
        if line.startswith("  "):
            assert parent, f"an indented entry before any package: {line!r}"
            paths.append(parent + name)
        else:
            parent = name if name.endswith("/") else ""
            paths.append(name)
    return paths


def tracked_tops(root: Path) -> set[str]:
    """Top-level Python packages (as 'name/') and scripts of the git checkout, plus docs/ and tests/."""
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    tops = {f.split("/")[0] + "/" for f in files if f.count("/") == 1 and f.endswith("/__init__.py")}
    tops |= {f for f in files if "/" not in f and f.endswith(".py")}
    return tops | {"docs/", "tests/"}


def test_the_readme_tree_matches_the_code():
    paths = readme_tree((ROOT / "README.md").read_text())
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"the README's Layout lists paths that do not exist: {missing}"
    unlisted = sorted(tracked_tops(ROOT) - set(paths))
    assert not unlisted, f"the README's Layout does not list {unlisted}; add a line for each"
    # A package whose files are listed has every module listed (subpackages count as one entry).
    for package in {p.rsplit("/", 1)[0] + "/" for p in paths if p.endswith(".py") and "/" in p}:
        here = {p for p in paths if p.startswith(package)}
        for f in sorted((ROOT / package).iterdir()):
            entry = package + f.name + ("/" if f.is_dir() else "")
            is_module = f.suffix == ".py" and f.name != "__init__.py"
            if (is_module or (f / "__init__.py").is_file()) and entry not in here:
                raise AssertionError(f"the README's Layout lists {package} file by file but not {entry}")


def test_the_tree_parser_reads_nesting_and_the_check_sees_a_missing_line(tmp_path):
    readme = "## Layout\n\n```text\ntrain.py   x\nmodel/     y\n  gpt.py   z\n  interop/ w\nrun.py  v\n```\n"
    assert readme_tree(readme) == ["train.py", "model/", "model/gpt.py", "model/interop/", "run.py"]
    assert "util.py" not in readme_tree(readme)  # so a new top-level module fails the check above


def test_evals_registry_names_every_eval_cli():
    from eval.__main__ import EVALS

    with_main = {p.stem for p in (ROOT / "eval").glob("*.py")
                 if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in ast.parse(p.read_text()).body)}
    assert set(EVALS) == with_main - {"__main__"}, "eval/__main__.py's EVALS must name every eval module with a main()"


def test_the_files_to_read_first_say_their_length():
    """README's "Read these files first": each `path` (N) is N lines long, and the total it states adds up."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Read these files first", 1)[1].split("\n## ", 1)[0]
    listed = [(path, int(n)) for path, n in re.findall(r"`([\w/]+\.py)` \((\d+)\)", section)]
    assert len(listed) >= 3, section
    for path, n in listed:
        assert len((ROOT / path).read_text().splitlines()) == n, f"{path} is not {n} lines; update the README"
    total, files = map(int, re.search(r"\((\d+) lines in (\d+) files\)", section).groups())
    assert (total, files) == (sum(n for _, n in listed), len(listed))
    assert len((ROOT / "train.py").read_text().splitlines()) <= 120  # the command line stays thin
