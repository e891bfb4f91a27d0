"""Every module of fpstate can be the first one imported: a circular import shows only in the
order that enters the cycle from the wrong side (the command line entered regset before
signal once, and every `fpstate campaign` failed)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import fpstate

PROBE = """
import importlib, sys
bad = []
for name in sys.argv[1:]:
    for m in [m for m in sys.modules if m == "fpstate" or m.startswith("fpstate.")]:
        del sys.modules[m]
    try:
        importlib.import_module(name)
    except ImportError as e:
        bad.append(f"{name}: {e}")
print("\\n".join(bad))
"""


def test_every_module_imports_first() -> None:
    names = [m.name for m in pkgutil.walk_packages(fpstate.__path__, "fpstate.")
             if not m.name.endswith("__main__")]
    assert "fpstate.kernel.x86.regset" in names and len(names) > 100
    out = subprocess.run([sys.executable, "-c", PROBE, *names], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ""
