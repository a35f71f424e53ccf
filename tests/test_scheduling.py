"""The suite and the subprocesses it starts run under the normal scheduling policy (SCHED_OTHER), never a real-time
one: a spinning SCHED_FIFO process on a 2-core machine starves everything else (tests/conftest.py resets any thread a
test leaves under a real-time policy and names that test)."""
import os
import subprocess
import sys

import conftest


def test_this_process_and_its_threads_are_under_the_normal_policy():
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    assert conftest._realtime_threads() == []
    assert conftest._FLIPPED == [], f"tests that switched the process to a real-time policy: {conftest._FLIPPED}"


def test_a_subprocess_starts_under_the_normal_policy():
    out = subprocess.run([sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert int(out) == os.SCHED_OTHER
