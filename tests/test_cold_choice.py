"""cold_attention="auto": the chooser times decode steps in each mode and runs the faster, rechecking the other."""

import pytest

from kvtier.cold_choice import ColdAttentionChooser


def run(chooser, step_seconds, steps, start=0.0):
    """Start ``steps`` decode steps, each lasting step_seconds[mode]; return the modes in order."""
    now, modes = start, []
    for _ in range(steps):
        mode = chooser.start_step(now)
        modes.append(mode)
        now += step_seconds[mode]
    return modes, now


def test_each_mode_is_tried_then_the_faster_runs_and_the_other_is_rechecked():
    chooser = ColdAttentionChooser(trials=2, recheck_every=4)
    modes, _ = run(chooser, {"stream": 0.10, "host": 0.04}, 14)
    assert modes[:4] == ["stream", "stream", "host", "host"]
    assert modes[4:] == ["host"] * 4 + ["stream"] + ["host"] * 4 + ["stream"]
    assert chooser.step_seconds("host") == pytest.approx(0.04)
    summary = chooser.summary()
    assert summary["steps"] == {"stream": 4, "host": 10} and summary["step_ms"]["stream"] == pytest.approx(100)


def test_a_change_in_speed_is_followed_at_the_next_recheck():
    chooser = ColdAttentionChooser(trials=2, recheck_every=4)
    _, now = run(chooser, {"stream": 0.02, "host": 0.05}, 8)
    assert chooser.mode == "stream"
    modes, _ = run(chooser, {"stream": 0.20, "host": 0.05}, 12, start=now)  # the link got busy
    assert chooser.step_seconds("stream") == pytest.approx(0.20)  # its fast steps aged out of the recent ones
    assert modes[-5:].count("host") == 4  # host now, stream only at its recheck


def test_a_slow_first_step_does_not_decide_and_prefill_is_not_timed():
    """The first host step compiles the numba kernel: a mode's time is the least of its recent steps. A prefill chunk
    between two decode steps pauses the timing."""
    chooser = ColdAttentionChooser(trials=2, recheck_every=100)
    now = 0.0
    for mode_seconds in (0.05, 0.05, 3.0, 0.02):  # stream, stream, host (compiling), host
        chooser.start_step(now)
        now += mode_seconds
    chooser.start_step(now)
    assert chooser.mode == "host" and chooser.step_seconds("host") == pytest.approx(0.02)
    chooser.pause()
    chooser.start_step(now + 100.0)  # after a long prefill: the step before it is not timed
    assert chooser.step_seconds("host") == pytest.approx(0.02)
