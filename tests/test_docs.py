"""The README and docs/ say what the code is: README's first screen fits and its status table names
modules and proofs that exist; every link resolves; docs/architecture.md's layers are the imports as
they are (parsed with ast, including imports inside functions) and every module it names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ARCH = ROOT / "docs" / "architecture.md"
# Imports from a layer to one above it that architecture.md names as exceptions: the factory loads the fake copy
# engine (a test double) inside engine_for, only when CACHEDATTN_FAKE_COPY_ENGINE asks for it.
UPWARD: set = {("cachedattn/transfer/factory.py", "cachedattn.testing.fake_engine")}


def _section(text: str, heading: str) -> str:
    """The text under `## heading` up to the next `## `."""
    m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"no '## {heading}' section"
    return m.group(1)


def _table(text: str) -> list[list[str]]:
    """The first Markdown table in `text`: its rows (header first, the |---| line left out) as cells."""
    rows, started = [], False
    for line in text.splitlines():
        if line.startswith("|"):
            started = True
            if not re.fullmatch(r"\|(---\|)+", line):
                rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
        elif started:
            break
    assert rows, "no table"
    return rows


def _paths(cell: str) -> list[str]:
    return re.findall(r"`([\w./-]+/[\w./-]*)`", cell)


# README


def test_readme_first_screen_fits_in_40_lines_and_the_whole_in_about_300():
    lines = README.read_text().splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("## ")]
    assert len(heads) >= 2 and heads[1] <= 40, f"{heads[1] if len(heads) > 1 else '-'} lines before the second ##"
    assert len(lines) <= 300, len(lines)


def test_readme_first_screen_has_the_three_commands_the_support_matrix_and_links():
    text = README.read_text()
    first = text[: text.index("\n## ", text.index("\n## ") + 1)]
    for cmd in ("bash scripts/setup.sh && python3 -m cachedattn replay",
                "bash scripts/setup.sh --vllm && python3 -m pytest tests",
                "bash scripts/setup.sh && python3 -m cachedattn serve"):
        assert re.search(rf"^{re.escape(cmd)}$", first, re.M), cmd
    assert "| build | what you get | how |" in first
    assert "(docs/architecture.md)" in first


def test_status_table_names_a_module_and_a_proof_that_exist_in_every_row():
    rows = _table(_section(README.read_text(), "Status"))
    assert rows[0] == ["feature", "state", "module", "proof"]
    assert len(rows) > 10
    for feature, state, module, proof in rows[1:]:
        modules, proofs = _paths(module), _paths(proof)
        assert state and modules and proofs, f"{feature}: a state, a module and a proof each"
        for p in modules:
            assert (ROOT / p).is_file(), f"{feature}: module {p} does not exist"
        for p in proofs:
            assert p.startswith(("tests/", "bench/results/", "docs/")), f"{feature}: {p} is no test or result"
            assert (ROOT / p).exists(), f"{feature}: proof {p} does not exist"


def test_status_table_says_the_gpu_path_never_ran_on_a_card():
    rows = {r[0]: r for r in _table(_section(README.read_text(), "Status"))}
    gpu = rows["GPU load and save path"]
    assert "fake copy engine" in gpu[1] and "never run on a card" in gpu[1]
    assert "remote tier" in " ".join(rows) and "built" in rows[next(k for k in rows if k.startswith("remote"))][1]


# links


def _markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+://|#|mailto:", target):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.relative_to(ROOT)}: link to {target} does not resolve"


# docs/architecture.md against the code


def _layers() -> tuple[dict[str, list[str]], dict[str, set[str]]]:
    """layer -> module paths, and layer -> layers it may import, from the doc's table."""
    rows = _table(_section(ARCH.read_text(), "Layers"))
    assert rows[0] == ["layer", "modules", "imports from cachedattn"]
    names = [r[0] for r in rows[1:]]
    where, allowed = {}, {}
    for layer, modules, imports in rows[1:]:
        where[layer] = _paths(modules) + re.findall(r"`(cachedattn/[\w.]+\.py)`", modules)
        allowed[layer] = {n for n in names if re.search(rf"\b{n}\b", imports)}
    return {k: sorted(set(v)) for k, v in where.items()}, allowed


def _layer_of(path: str, where: dict[str, list[str]]) -> str | None:
    best = None
    for layer, prefixes in where.items():
        for p in prefixes:
            if (path == p or (p.endswith("/") and path.startswith(p))) and (best is None or len(p) > len(best[1])):
                best = (layer, p)
    return best[0] if best else None


def _module_path(name: str) -> str:
    """cachedattn.a.b -> the file or package folder that defines it."""
    base = ROOT / name.replace(".", "/")
    if (base.with_suffix(".py")).is_file():
        return str(base.with_suffix(".py").relative_to(ROOT))
    if base.is_dir():
        return str(base.relative_to(ROOT)) + "/"
    return str(base.relative_to(ROOT))


def _load_time_nodes(tree: ast.AST):
    """The nodes of `tree` that run when the module is loaded: all but the bodies of functions and lambdas."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo += [c for c in ast.iter_child_nodes(node)
                 if not isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]


def _imports(path: Path, at_load: bool = False) -> list[tuple[str, int]]:
    """Every module `path` imports (top of file or inside a function; `at_load`: only those its loading runs),
    absolute, with its line."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    tree = ast.parse(path.read_text())
    for node in _load_time_nodes(tree) if at_load else ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package[: len(package) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:  # `from pkg import mod` imports pkg.mod when that is a module
                sub = f"{base}.{a.name}"
                target = ROOT / sub.replace(".", "/")
                is_module = target.with_suffix(".py").is_file() or target.is_dir() or any(
                    target.parent.glob(f"{target.name}.*.so"))
                out.append((sub if is_module else base, node.lineno))
    return out


def _sources() -> list[Path]:
    return sorted((ROOT / "cachedattn").rglob("*.py"))


def test_every_module_the_architecture_names_exists():
    text = ARCH.read_text()
    named = set(re.findall(r"`(cachedattn/[\w/.]*)`", _section(text, "One cached turn, from `generate` to the store and back")))
    where, _ = _layers()
    named |= {p for ps in where.values() for p in ps}
    assert len(named) > 30
    for p in sorted(named):
        assert (ROOT / p).exists(), f"docs/architecture.md names {p}, which does not exist"


def test_every_module_belongs_to_one_layer_of_the_architecture():
    where, _ = _layers()
    for path in _sources():
        rel = str(path.relative_to(ROOT))
        assert _layer_of(rel, where), f"{rel} is in no layer of docs/architecture.md"


def test_imports_go_only_where_the_architecture_says():
    where, allowed = _layers()
    wrong, upward = [], set()
    for path in _sources():
        rel = str(path.relative_to(ROOT))
        mine = _layer_of(rel, where)
        for name, line in _imports(path):
            if name == "cachedattn._core":
                if rel != "cachedattn/native.py":
                    wrong.append(f"{rel}:{line} imports the extension (only cachedattn/native.py may)")
                continue
            if not (name == "cachedattn" or name.startswith("cachedattn.")):
                continue
            theirs = "face" if name == "cachedattn" else _layer_of(_module_path(name), where)
            if theirs in (mine, None) or theirs in allowed[mine]:
                continue
            if (rel, name) in UPWARD:
                upward.add((rel, name))
                continue
            wrong.append(f"{rel}:{line} ({mine}) imports {name} ({theirs})")
    assert not wrong, "imports docs/architecture.md does not allow:\n" + "\n".join(wrong)
    assert upward == UPWARD


def test_no_production_module_loads_the_test_doubles():
    """cachedattn/testing/ (the fake copy engine, the race detector, their watch on transfer/checkpoints.py) stays
    out of production: no module outside it imports it when loaded, at the top or in a class body (the one
    import UPWARD allows sits inside the function that hands out the fake engine when the environment asks)."""
    wrong = []
    for path in _sources():
        rel = str(path.relative_to(ROOT))
        if rel.startswith("cachedattn/testing/"):
            continue
        wrong += [f"{rel}:{line} imports {name}" for name, line in _imports(path, at_load=True)
                  if name == "cachedattn.testing" or name.startswith("cachedattn.testing.")]
    assert not wrong, "production modules that load cachedattn.testing:\n" + "\n".join(wrong)


def test_third_party_libraries_are_imported_only_in_their_layer():
    rows = _table(_section(ARCH.read_text(), "Layers").split("Third-party libraries")[1])
    assert rows[0] == ["library", "imported only in"]
    wrong = []
    for libs, places in rows[1:]:
        prefixes = _paths(places) + re.findall(r"`(cachedattn/[\w.]+\.py)`", places)
        for lib in re.findall(r"`(\w+)`", libs):
            for path in _sources():
                rel = str(path.relative_to(ROOT))
                for name, line in _imports(path):
                    if name.split(".")[0] == lib and not any(rel == p or rel.startswith(p) for p in prefixes):
                        wrong.append(f"{rel}:{line} imports {name}")
    assert not wrong, "\n".join(wrong)
    transformers = next(r for r in rows if "`transformers`" in r[0])
    assert transformers[1] == "`cachedattn/hf/`"


def test_the_native_core_includes_no_torch():
    hits = [f"{p.relative_to(ROOT)}: {line}" for p in (ROOT / "csrc").rglob("*") if p.is_file()
            for line in p.read_text(errors="replace").splitlines()
            if re.match(r"\s*#\s*include\s*[<\"](torch|ATen|c10)/", line)]
    assert not hits, hits
