"""The one-line error contract of the entry points, as tests check it."""
from __future__ import annotations

import pytest


def error_line(main, argv: list[str], capsys) -> str:
    """``main(argv)`` under the entry points' wrapper, in this process (every case fails before
    any process work): exit 2 and exactly one line on stderr."""
    from launch.runtime.loop import run_main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), (e.value.code, err)
    return err[0]
