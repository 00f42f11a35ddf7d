"""`sohoa demo` stopped with SIGTERM mid-run: no orphan OCR workers or broker, no keys left in TMPDIR."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest


def _stacks(pid: int, output: list[str]) -> str:
    """Every thread's stack in the demo (``sohoa`` dumps them on SIGUSR1): a hang says where it is."""
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not any("most recent call first" in line for line in output):
        time.sleep(0.1)
    return "".join(output[-200:])


@pytest.mark.timeout(180)
def test_sigterm_cleans_up(tmp_path: Path) -> None:
    # Without --exit-when-synced the demo serves until stopped: the SIGTERM always lands mid-run
    # (with it, a fast sync could end the demo first, exit 0, and the test would measure nothing).
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "sohoa.cli", "demo", "--pages", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    try:
        deadline = time.monotonic() + 90
        for line in proc.stdout:
            if line.startswith("sohoa demo in "):
                break
            assert time.monotonic() < deadline, "the demo did not start"
        # Keep reading: a full pipe would block the demo's next progress line, and a process blocked in
        # write() cannot act on SIGTERM (the test would measure the pipe, not the demo).
        output: list[str] = []
        threading.Thread(target=output.extend, args=(proc.stdout,), daemon=True).start()
        homes = list(tmp_path.glob("sohoa-demo-*"))
        assert len(homes) == 1 and (homes[0] / "central" / "keys").is_dir()
        children: list[psutil.Process] = []
        for _ in range(40):   # until the OCR workers are up
            children = psutil.Process(proc.pid).children(recursive=True)
            if len(children) >= 2:
                break
            time.sleep(0.25)
        assert any("mosquitto" in c.name() for c in children), [c.name() for c in children]
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            where = _stacks(proc.pid, output)
            pytest.fail(f"the demo did not stop within 60 s of SIGTERM; where it was:\n{where}")
        assert code == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    _, alive = psutil.wait_procs(children, timeout=15)
    assert alive == [], [(p.pid, p.name()) for p in alive]
    assert list(tmp_path.glob("sohoa-demo-*")) == []
