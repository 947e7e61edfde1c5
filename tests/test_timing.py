"""torchprune.timing: warm-up, round-robin order, medians, and the device synchronize."""

import pytest
import torch

from torchprune import timing


def test_warm_up_calls_each_runner_in_turn_and_returns_seconds():
    calls = []
    seconds = timing.warm_up({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, calls=2)
    assert calls == ["a", "a", "b", "b"]
    assert seconds >= 0


def test_samples_are_taken_round_robin():
    calls = []
    samples = timing.sample_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
    assert calls == ["a", "b"] * 3
    assert {name: len(values) for name, values in samples.items()} == {"a": 3, "b": 3}
    assert all(v >= 0 for values in samples.values() for v in values)


def test_settle_times_only_the_last_of_each_runners_back_to_back_calls():
    calls = []

    def runner(name):
        return lambda: calls.append(name)

    samples = timing.sample_interleaved({"a": runner("a"), "b": runner("b")}, repeats=2, settle=2)
    assert calls == ["a", "a", "a", "b", "b", "b"] * 2
    assert {name: len(values) for name, values in samples.items()} == {"a": 2, "b": 2}
    calls.clear()
    timing.time_rounds({"a": runner("a"), "b": runner("b")}, repeats=1, rounds=2, warmup=1, settle=1)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2


@pytest.mark.parametrize("settle", [-1, 1.5, True, "1"])
def test_settle_must_be_a_non_negative_int(settle):
    calls = []
    with pytest.raises(ValueError, match="`settle` must be a non-negative int"):
        timing.sample_interleaved({"a": lambda: calls.append("a")}, repeats=1, settle=settle)
    assert calls == []


def test_medians_and_time_interleaved():
    assert timing.medians({"a": [3.0, 1.0, 2.0], "b": [5.0]}) == {"a": 2.0, "b": 5.0}
    calls = []
    result = timing.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                     repeats=4, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 4
    assert set(result) == {"a", "b"} and all(v >= 0 for v in result.values())


def test_time_rounds_warms_up_once_then_times_each_round_round_robin():
    calls = []
    rounds = timing.time_rounds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                repeats=2, rounds=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 6
    assert len(rounds) == 3 and all(set(one) == {"a", "b"} for one in rounds)
    assert all(v >= 0 for one in rounds for v in one.values())


def test_time_rounds_needs_a_round():
    calls = []
    with pytest.raises(ValueError, match="rounds must be a positive integer, got 0"):
        timing.time_rounds({"a": lambda: calls.append("a")}, repeats=2, rounds=0)
    assert calls == []  # nothing ran


@pytest.mark.parametrize("device", [None, torch.device("cpu")])
def test_synchronize_is_a_no_op_off_cuda(device):
    timing.synchronize(device)  # must not touch torch.cuda on a CPU-only machine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_synchronize_waits_for_cuda_work():
    x = torch.randn(256, 256, device="cuda")
    seconds = timing.time_interleaved({"mm": lambda: x @ x}, repeats=3, warmup=1, device=x.device)
    assert seconds["mm"] > 0
