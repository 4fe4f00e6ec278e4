"""Named fault-injection points, used by the reliability tests to kill a real process at an exact moment.

Set ADVPIPE_FAULT=<point> in a process's environment and it sends itself SIGKILL
when it reaches that point: the same signal `kill -9` sends, at a moment a test
could not hit reliably from outside. Unset (always, in normal use) it costs one
dictionary lookup. Points: source-read, mid-shard, between-shards,
manifest-write, after-manifest.
"""

from __future__ import annotations

import os
import signal

ENVIRONMENT = "ADVPIPE_FAULT"


def fault_point(name: str) -> None:
    if os.environ.get(ENVIRONMENT) == name:
        os.kill(os.getpid(), signal.SIGKILL)
