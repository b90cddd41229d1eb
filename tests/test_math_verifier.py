import os
import signal
import threading
import time

import pytest
from conftest import ROOT, load_script

from nanorlhf.rewards import build_rewards

mv = load_script("examples/r1-v0/math_verifier.py")
mv.WORKERS = 2
TOWER = r"\boxed{9^{9^{9^{9^{9^{9}}}}}}"  # sympy works on this for minutes


@pytest.fixture(scope="module", autouse=True)
def shutdown_workers():
    yield
    mv._shutdown()


def score(completion, answer, **kw):
    return mv.math_reward([""], [completion], [answer], **kw)[0]


@pytest.mark.parametrize("text, boxed", [
    (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{1} then \boxed{\sqrt{\frac{3}{4}}}", r"\sqrt{\frac{3}{4}}"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"\boxed{}", ""),
    (r"\boxed{\frac{1}{", None),
    ("no box here", None),
])
def test_last_boxed(text, boxed):
    assert mv.last_boxed(text) == boxed


@pytest.mark.parametrize("completion, answer", [
    (r"The answer is \boxed{\frac{1}{2}}.", "0.5"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}"),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}"),
    (r"\boxed{\dfrac{\pi}{2}}", r"\frac{\pi}{2}"),
    (r"\boxed{1,000}", "1000"),
    (r"\boxed{[1, 2)}", "[1,2)"),
    (r"\boxed{(-\infty, 0)}", r"(-\infty,0)"),
    (r"\boxed{[1,2) \cup (3,4]}", r"[1,2)\cup(3,4]"),
    (r"\boxed{x \in [1,2)}", "[1,2)"),
    (r"\boxed{\{3, 2, 1\}}", r"\{1,2,3\}"),
    (r"\boxed{x = 3}", "3"),
])
def test_equal_values_in_different_forms(completion, answer):
    assert score(completion, answer) == 1.0


@pytest.mark.parametrize("completion, answer", [
    (r"\boxed{3}", "2"),
    (r"\boxed{[1,2)}", "[1,2]"),
    (r"\boxed{\{1,2\}}", r"\{1,3\}"),
    (r"\boxed{(2,1)}", "(1,2)"),
    (r"\boxed{\frac{1}{3}}", "0.333"),
    ("The answer is 2.", "2"),
    (r"\boxed{\frac{1}{", "1"),
    (r"\boxed{}", "0"),
    ("", "0"),
])
def test_wrong_missing_or_malformed_is_zero(completion, answer):
    assert score(completion, answer) == 0.0


def test_last_boxed_answer_counts():
    completion = r"First \boxed{3}, but wait: \boxed{\frac{4}{2}}"
    assert mv.math_reward(["", ""], [completion, completion], ["2", "3"]) == [1.0, 0.0]


def test_pathological_answer_times_out_then_pool_recovers():
    score(r"\boxed{1}", "1")  # workers up
    pids, before = [w.pid for w in mv._workers], dict(mv.verifier_stats)
    # a group repeating the same answer costs one timeout, not one per completion
    assert mv.math_reward(["", "", ""], [TOWER, TOWER, r"\boxed{1}"], ["1", "1", "1"], timeout=2) == [0.0, 0.0, 1.0]
    assert mv.verifier_stats["timeouts"] == before["timeouts"] + 1
    assert mv.verifier_stats["crashes"] == before["crashes"]
    killed = [pid for pid in pids if pid not in [w.pid for w in mv._workers]]
    assert len(killed) == 1 and not os.path.exists(f"/proc/{killed[0]}")  # reaped: no zombie
    assert score(r"\boxed{2\sqrt{2}}", r"\sqrt{8}") == 1.0
    assert len(mv._workers) == mv.WORKERS


def test_worker_crash_scores_zero_and_is_counted(monkeypatch):
    mv._shutdown()
    monkeypatch.setattr(mv, "WORKERS", 1)
    score(r"\boxed{1}", "1")
    crashes, result = mv.verifier_stats["crashes"], []
    checking = threading.Thread(target=lambda: result.extend(mv.math_reward([""], [TOWER], ["1"], timeout=60)))
    checking.start()
    time.sleep(0.5)
    os.kill(mv._workers[0].pid, signal.SIGKILL)  # as the OOM killer would
    checking.join(timeout=30)
    assert result == [0.0]
    assert mv.verifier_stats["crashes"] == crashes + 1
    assert score(r"\boxed{0.25}", r"\frac{1}{4}") == 1.0


def test_as_reward_fn_through_the_loader():
    rewards = build_rewards("", os.path.join(ROOT, "examples/r1-v0/math_verifier.py:math_reward"), "")
    total, _ = rewards(["q1", "q2"], [r"\boxed{\frac{1}{2}}", "I give up"], {"answer": ["0.5", "0.5"]})
    rewards.functions[0].__globals__["_shutdown"]()  # the loader made its own copy of the module, with its own workers
    assert total.tolist() == [1.0, 0.0]
