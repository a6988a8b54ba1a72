"""What a driver killed outright (SIGKILL, OOM) leaves behind, removed by the next start.

A driver that sees its own end (an error, SIGTERM, Ctrl-C) shuts its local Ray cluster down
and removes its rendezvous directory itself. One killed with SIGKILL cannot: Ray's dashboard
and runtime-env agents of its cluster linger for a minute or more, and its
``$TMPDIR/distca-rendezvous-<pid>-*`` directory stays. So every driver that starts a local
cluster records ``<pid> -> Ray session directory`` under ``$TMPDIR/distca-drivers/``, and
:func:`clean_up_dead_drivers` (run before a local cluster starts) ends the processes of every
recorded session whose driver is gone and removes its rendezvous directories. Only sessions a
distca driver recorded are touched: other Ray clusters on the machine are left alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

RENDEZVOUS_PREFIX = "distca-rendezvous-"


def _registry() -> Path:
    return Path(tempfile.gettempdir()) / "distca-drivers"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def rendezvous_dir() -> str:
    """A fresh rendezvous directory named after this driver's pid."""
    return tempfile.mkdtemp(prefix=f"{RENDEZVOUS_PREFIX}{os.getpid()}-")


def register(session_dir: str) -> None:
    """Record that this driver runs the local Ray cluster of ``session_dir``."""
    _registry().mkdir(exist_ok=True)
    (_registry() / str(os.getpid())).write_text(session_dir)


def unregister() -> None:
    (_registry() / str(os.getpid())).unlink(missing_ok=True)


def _of_session(proc, session: str) -> bool:
    """Whether ``proc`` belongs to the Ray session directory ``session``: named in its command
    line, or (agents rename themselves ``ray::…``) holding one of its log files open."""
    import psutil

    cmdline = " ".join(proc.info["cmdline"] or ())
    if session in cmdline:
        return True
    if not cmdline.startswith("ray::"):
        return False
    try:
        return any(f.path.startswith(session) for f in proc.open_files())
    except psutil.Error:
        return False


def clean_up_dead_drivers() -> list[str]:
    """End the Ray processes and remove the rendezvous directories of dead drivers; returns
    one line per thing removed (for a log message)."""
    import psutil

    done = []
    dead_sessions = {}
    if _registry().is_dir():
        for entry in _registry().iterdir():
            if entry.name.isdigit() and not _alive(int(entry.name)):
                dead_sessions[entry] = entry.read_text().strip()
    for entry, session in dead_sessions.items():
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if session and _of_session(proc, session):
                try:
                    proc.send_signal(signal.SIGKILL)
                    done.append(f"ended pid {proc.pid} of the Ray session {session} left by "
                                f"driver {entry.name}")
                except psutil.Error:
                    pass
        entry.unlink(missing_ok=True)
    for path in Path(tempfile.gettempdir()).glob(f"{RENDEZVOUS_PREFIX}*"):
        pid = path.name[len(RENDEZVOUS_PREFIX):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path} left by driver {pid}")
    return done
