"""The runtime never needs the reference stack (torch, transformers, peft)."""

import subprocess
import sys


def test_importing_every_module_loads_no_reference_library():
    # A fresh interpreter, so nothing another test imported can hide an import.
    code = (
        "import importlib, pkgutil, sys, tinylora\n"
        "for m in pkgutil.walk_packages(tinylora.__path__, 'tinylora.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(n for n in ('torch', 'transformers', 'peft') if n in sys.modules)\n"
        "print('loaded:', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
