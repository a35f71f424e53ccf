"""The suite and the subprocesses it starts run under the normal scheduling policy (SCHED_OTHER), never a real-time
one: a spinning SCHED_FIFO process on a 2-core machine starves everything else (tests/conftest.py resets any thread a
test leaves under a real-time policy and fails that test). The cause found by bisecting the suite: the SVT-AV1
encoder, run as root, moves its caller and its threads to SCHED_FIFO; the LeRobot fixture encodes AV1 in a child."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import conftest


def test_this_process_and_its_threads_are_under_the_normal_policy():
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    assert conftest._realtime_threads() == []
    assert conftest._FLIPPED == [], f"tests that switched the process to a real-time policy: {conftest._FLIPPED}"


def test_a_subprocess_starts_under_the_normal_policy():
    out = subprocess.run([sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert int(out) == os.SCHED_OTHER


def test_av1_fixture_videos_leave_this_process_under_the_normal_policy(tmp_path):
    from lerobot_fixture import frame_colour, write_video
    import numpy as np
    frames = [np.full((16, 16, 3), frame_colour(0, i), np.uint8) for i in range(4)]
    write_video(tmp_path / "a.mp4", frames, 5, "libsvtav1")
    assert (tmp_path / "a.mp4").stat().st_size > 0
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    assert conftest._realtime_threads() == []


@pytest.mark.skipif(os.geteuid() != 0, reason="SVT-AV1 raises its threads' policy only when run as root")
def test_the_cause_svt_av1_in_process_switches_root_to_sched_fifo(tmp_path):
    """Why the fixture encodes AV1 in a child process: in-process, the encoder moves the caller to SCHED_FIFO."""
    code = ("import os, sys, numpy as np; sys.path.insert(0, 'tests'); import lerobot_fixture as f; "
            "f._encode(__import__('pathlib').Path(sys.argv[1]), [np.zeros((16, 16, 3), np.uint8)] * 4, 5, 'libsvtav1'); "
            "print(os.sched_getscheduler(0))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "b.mp4")], capture_output=True, text=True,
                         timeout=120, check=True, cwd=Path(__file__).parent.parent).stdout
    assert int(out.split()[-1]) == os.SCHED_FIFO
