"""Ctrl-C during an import waits for the import to end (torch aborts the process otherwise)."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time

import pytest

from swarmllm.commands.interrupts import interruptible

MODULE = textwrap.dedent(
    """
    import os, signal, time
    os.kill(os.getpid(), signal.SIGINT)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # the handler runs here, in the module's top level
        pass
    FINISHED = True
    """
)


def test_a_ctrl_c_inside_an_import_is_raised_after_the_import(tmp_path, monkeypatch):
    (tmp_path / "slow_import_for_ctrl_c.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    interrupted_after_import = False
    with interruptible():
        try:
            import slow_import_for_ctrl_c  # noqa: F401
        except KeyboardInterrupt:
            pytest.fail("the KeyboardInterrupt was raised inside the import")
        assert sys.modules["slow_import_for_ctrl_c"].FINISHED
        deadline = time.monotonic() + 5.0
        try:
            while time.monotonic() < deadline:
                time.sleep(0.01)
        except KeyboardInterrupt:
            interrupted_after_import = True
            raise
    assert interrupted_after_import, "the deferred Ctrl-C never came"


def test_a_ctrl_c_outside_imports_is_raised_at_once(capfd):
    started = time.monotonic()
    with interruptible():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5.0)
        pytest.fail("no KeyboardInterrupt")
    assert time.monotonic() - started < 1.0
    assert capfd.readouterr().err == "interrupted\n"
