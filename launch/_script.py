"""What makes ``launch/mae.py`` and ``launch/clip.py`` runnable as scripts.

``deepspeed launch/mae.py``, ``torchrun launch/mae.py`` and ``python launch/mae.py`` run the file
as a script, which puts its folder, ``launch/``, first on ``sys.path``; there ``mae.py`` and
``clip.py`` would shadow the ``mae`` and ``clip`` packages. The two scripts import this module
by its bare name (it sits beside them, the one place where that works), which swaps that entry
for the project root, and then run their stage module (``launch.stages.mae``,
``launch.stages.clip``) through :func:`launch.runtime.loop.run_main`.
"""
import importlib
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))


def run(module: str) -> None:
    from launch.runtime.loop import run_main

    run_main(importlib.import_module(module).main)
