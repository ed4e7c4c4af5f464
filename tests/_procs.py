"""Server processes the tests start: stop one as Ctrl-C would, and require a clean exit."""

from __future__ import annotations

import signal
import subprocess
import threading


def stop_cleanly(proc: subprocess.Popen[str], reader: threading.Thread, log: list[str]) -> None:
    """SIGINT ``proc``, wait for it (killing it after 30 s), and require exit status 0."""
    proc.send_signal(signal.SIGINT)
    try:
        status = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    finally:
        reader.join(10)
        if proc.stderr is not None:
            proc.stderr.close()
    assert status == 0, "".join(log)
