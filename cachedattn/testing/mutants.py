"""Mutants of the GPU path's ordering: each ordering call site found in the
source, and the same code with that one call removed.

A *site* is a call (or a bound-method reference handed on, such as
``load.before_release = self._wait_copies``) whose name is an ordering
operation of the copy engine (:data:`ORDERING`), inside a function of a
production module. Its name is ``file:Qualified.function:call`` (``#2``, ``#3``
for a repeated call in one function), e.g.
``transfer/gpu_load.py:GpuLoad._issue:wait_for_stream``.

``apply(site)`` recompiles the enclosing top-level function or method with that
node replaced by ``None`` and installs it on its module or class until the
context ends; nothing else of the module is touched, so every other module's
references stay valid and a mutant costs one compile.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import os
import sys
import textwrap
from dataclasses import dataclass

import cachedattn

ORDERING = frozenset(
    {"wait_for_stream", "stream_wait_layer", "wait_ticket", "wait_layer", "synchronize", "layer_done", "ticket_done",
     "_wait_copies"}
)
_PKG = os.path.dirname(os.path.abspath(cachedattn.__file__))


@dataclass(frozen=True)
class Site:
    module: str  # dotted module name
    qualname: str  # of the top-level function or method holding the call
    call: str  # the ordering name called or handed on
    nth: int  # 1 for the first such call in that function, 2 for the next...
    line: int

    @property
    def name(self) -> str:
        path = self.module.split(".", 1)[1].replace(".", "/") + ".py"
        return f"{path}:{self.qualname}:{self.call}" + (f"#{self.nth}" if self.nth > 1 else "")


def _receiver(node: ast.Attribute) -> str:
    return ast.unparse(node.value)


def _ordering_nodes(fn: ast.AST):
    """(node, name) of every ordering call or reference in `fn`, in source order (torch.cuda's own excluded)."""
    called = {id(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)}
    out = []
    for n in ast.walk(fn):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ORDERING:
            if _receiver(n.func) != "torch.cuda":  # a device-wide sync for timing, not an edge of the path
                out.append((n, n.func.attr))
        elif isinstance(n, ast.Attribute) and n.attr in ORDERING and id(n) not in called and isinstance(n.ctx, ast.Load):
            out.append((n, n.attr))
    return sorted(out, key=lambda x: (x[0].lineno, x[0].col_offset))


def _functions(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{sub.name}", sub


def _source(module: str) -> str:
    return open(os.path.join(_PKG, *module.split(".")[1:]) + ".py").read()


def find_sites(modules) -> list[Site]:
    """Every ordering site of `modules` (dotted names)."""
    sites = []
    for module in modules:
        for qualname, fn in _functions(ast.parse(_source(module))):
            seen: dict[str, int] = {}
            for node, name in _ordering_nodes(fn):
                seen[name] = seen.get(name, 0) + 1
                sites.append(Site(module, qualname, name, seen[name], node.lineno))
    return sites


class _Remove(ast.NodeTransformer):
    def __init__(self, target):
        self.target = target

    def visit(self, node):
        if node is self.target:
            return ast.copy_location(ast.Constant(None), node)
        return super().visit(node)


def _mutated(site: Site) -> ast.FunctionDef:
    fn = dict(_functions(ast.parse(_source(site.module))))[site.qualname]
    node = [n for n, name in _ordering_nodes(fn) if name == site.call][site.nth - 1]
    fn = _Remove(node).visit(fn)
    fn.decorator_list = []
    return fn


def mutated_source(site: Site) -> str:
    """The enclosing function's source with the site removed (what `apply` installs)."""
    return ast.unparse(_mutated(site))


@contextlib.contextmanager
def apply(site: Site):
    """The code with `site` removed, installed within the block."""
    mod = importlib.import_module(site.module)
    fn = _mutated(site)
    code = ast.Module(body=[fn], type_ignores=[])
    ast.fix_missing_locations(code)
    ns: dict = {}
    exec(compile(code, f"<mutant {site.name}>", "exec"), mod.__dict__, ns)
    new = ns[fn.name]
    if "." in site.qualname:
        owner = getattr(mod, site.qualname.split(".")[0])
        old = inspect.getattr_static(owner, fn.name)
        if isinstance(old, classmethod):
            new = classmethod(new)
        elif isinstance(old, staticmethod):
            new = staticmethod(new)
        places = [owner]
    else:  # a module-level function: also where other modules imported it by name
        old = getattr(mod, fn.name)
        places = [m for m in list(sys.modules.values()) if getattr(m, "__name__", "").startswith("cachedattn.")
                  and getattr(m, "__dict__", {}).get(fn.name) is old]
    for p in places:
        setattr(p, fn.name, new)
    try:
        yield
    finally:
        for p in places:
            setattr(p, fn.name, old)


def source_snippet(site: Site) -> str:
    return textwrap.dedent(_source(site.module).splitlines()[site.line - 1]).strip()
