"""Crash and delay points, for the tests that kill a run mid-way and resume it.

LORA_SUBSPACE_FAILPOINT=name[:n] kills this process with SIGKILL (no cleanup, no finally blocks:
what a lost node or an OOM kill does) the n-th time `name` is reached (default the first).
LORA_SUBSPACE_DELAYPOINT=name:seconds sleeps there every time, so that a test can act while the
work is in flight. Unset, `reach` costs two dictionary lookups.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

_reached: Counter[str] = Counter()


def reach(name: str) -> None:
    delay = os.environ.get("LORA_SUBSPACE_DELAYPOINT")
    if delay and delay.partition(":")[0] == name:
        time.sleep(float(delay.partition(":")[2]))
    armed = os.environ.get("LORA_SUBSPACE_FAILPOINT")
    if not armed:
        return
    target, _, count = armed.partition(":")
    if target != name:
        return
    _reached[name] += 1
    if _reached[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
