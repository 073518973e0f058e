"""Triton launches a kernel on the current CUDA device (and its current stream), not on the
device of the tensors it is given: tensors on cuda:1 with cuda:0 current are addressed from
the wrong GPU (an error, or garbage read silently). latentfast.kernels.launch, which every
launch goes through (tests/ops/test_triton_launch_limit.py), makes the tensors' device
current for the launch. Checked here without a GPU, on tensors that say they live on cuda:1
and a recorded torch.cuda.device; on a machine with two GPUs, tests/test_gpu.py runs an op
on the second one."""
from __future__ import annotations

import contextlib

import torch

from latentfast import kernels


class _OnCuda(torch.Tensor):
    """A CPU tensor that reports itself as living on cuda:1."""

    @property
    def is_cuda(self):
        return True

    def get_device(self):
        return 1


class _Kernel:
    """kernel[grid](*args) that records the CUDA device current at the launch."""

    def __init__(self, state):
        self.state, self.launches = state, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(self.state["current"])


def _fake_cuda(monkeypatch):
    state = {"current": 0}

    @contextlib.contextmanager
    def device(index):
        before, state["current"] = state["current"], index
        try:
            yield
        finally:
            state["current"] = before
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "device", device)
    return state


def test_launch_runs_on_the_tensors_device(monkeypatch):
    state = _fake_cuda(monkeypatch)
    kernel = _Kernel(state)
    on_1 = torch.zeros(3).as_subclass(_OnCuda)
    kernels.launch(kernel, (1,), on_1, 3, BLOCK=4)
    kernels.launch(kernel, (1,), 3, out=on_1)  # (a tensor passed by keyword)
    assert kernel.launches == [1, 1] and state["current"] == 0  # and the current device restored
    state["current"] = 1
    kernels.launch(kernel, (1,), on_1)  # already current: no switch
    state["current"] = 0
    kernels.launch(kernel, (1,), torch.zeros(3), 3)  # CPU tensors (the interpreter): left alone
    assert kernel.launches == [1, 1, 1, 0]
