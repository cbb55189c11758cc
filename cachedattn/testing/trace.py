"""Which of the package's modules and classes one piece of work enters.

A reader who follows one cached turn through the store meets every module and
class this counts: `entered(fn)` runs fn() under sys.setprofile and records,
for each Python function of `cachedattn` called (on any thread the work starts
is not followed: loads run on the caller's thread), its module and its class
(the qualified name's owner, from the code object). Used by
tests/store/test_store_trace.py to keep the count of one cached turn bounded.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field


@dataclass
class Entered:
    modules: set[str] = field(default_factory=set)
    classes: set[str] = field(default_factory=set)

    def summary(self) -> str:
        return f"{len(self.modules)} modules, {len(self.classes)} classes"


def _owner(code) -> str | None:
    """The class a function is defined in, from its qualified name (None for a module-level one)."""
    outer = code.co_qualname.split(".<locals>.")[0].split(".")  # a nested function counts as its outer one's
    return ".".join(outer[:-1]) or None


def entered(fn, package: str = "cachedattn", skip: tuple[str, ...] = ()) -> Entered:
    """Runs fn() and returns the modules (and classes, as module:Class) of `package` it entered;
    modules whose name starts with one of `skip` are left out (this module always is)."""
    out = Entered()
    prefix = package + "."
    seen: set = set()
    skip = (__name__,) + tuple(skip)

    def prof(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        if code in seen:
            return
        seen.add(code)
        mod = frame.f_globals.get("__name__", "")
        if not (mod == package or mod.startswith(prefix)) or mod.startswith(skip):
            return
        out.modules.add(mod)
        owner = _owner(code)
        if owner is not None:
            out.classes.add(f"{mod}:{owner}")

    old = sys.getprofile()
    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(old)
    return out
