"""Named fault-injection points, used by the reliability tests to stop or kill a real process at an exact moment.

Set ADVPIPE_FAULT=<point> in a process's environment and it sends itself SIGKILL
when it reaches that point: the same signal `kill -9` sends, at a moment a test
could not hit reliably from outside. ADVPIPE_FAULT=<point>:stop sends SIGSTOP
instead: the process freezes there (holding its task and its open files) until
the test kills or continues it. With ADVPIPE_FAULT_ONCE=<path> only the first
process to reach the point acts, and writes its pid to <path> (processes that a
Dask nanny restarts inherit the environment and must not fault again).
Unset (always, in normal use) it costs one dictionary lookup. Points:
source-read, mid-shard, shard-write (half of an HDF5 shard's bytes written),
between-shards, manifest-write, after-manifest; in training, epoch-N-saved and step-N-saved (after
the checkpoint of epoch N or step N is written).
"""

from __future__ import annotations

import os
import signal

ENVIRONMENT = "ADVPIPE_FAULT"
ONCE = "ADVPIPE_FAULT_ONCE"


def fault_point(name: str) -> None:
    wanted = os.environ.get(ENVIRONMENT)
    if wanted is None:
        return
    point, _, action = wanted.partition(":")
    if point == name and _first(os.environ.get(ONCE)):
        os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)


def _first(claim: str | None) -> bool:
    """True unless ADVPIPE_FAULT_ONCE names a file that another process already created."""
    if claim is None:
        return True
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{os.getpid()}\n")
    return True
