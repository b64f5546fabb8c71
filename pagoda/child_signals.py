"""The shutdown signals that reach a server's child processes (its engine cores and their worker
ranks) along with the front end: Ctrl-C in a terminal sends SIGINT to the whole process group, and
`systemctl stop` sends SIGTERM to every process of the unit (as `kill -- -PGID` does).

The front end owns shutdown: it aborts the requests in flight, then tells each core to stop, and
each core its ranks. A child that died of the signal first would make an orderly stop look like the
engine's death (logged as an error, exit status 1: a failed unit to systemd). So a child ignores
SIGINT, and holds a SIGTERM back for a grace period: long enough for the front end's stop (its
open connections get 3 s), short enough that a SIGTERM sent to the child alone still ends it."""

from __future__ import annotations

import os
import signal
import threading

SIGTERM_GRACE_S = 10.0


def leave_shutdown_to_the_front_end() -> None:
    """In a child's main thread, before its work starts."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _hold_sigterm)


def _hold_sigterm(signum: int, frame: object) -> None:
    # Restored first: a second SIGTERM ends the process at once, as would the first one's timer.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    timer = threading.Timer(SIGTERM_GRACE_S, os.kill, (os.getpid(), signal.SIGTERM))
    timer.daemon = True  # an orderly stop within the grace ends the process without waiting for it
    timer.start()
