"""apet/kernels/dependent_launch.py: where programmatic dependent launch applies, and the fallback to plain launches
when a Triton's launcher does not take ``launch_pdl`` (the kernel still runs, once, with the same arguments)."""

from __future__ import annotations

import torch

from apet.kernels import dependent_launch


class FakeKernel:
    """Records launches like ``kernel[grid](*args, **kwargs)``; refuses ``launch_pdl`` as an older launcher does."""

    def __init__(self, accepts_pdl: bool) -> None:
        self.accepts_pdl, self.launches = accepts_pdl, []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            if "launch_pdl" in kwargs and not self.accepts_pdl:
                raise KeyError("Keyword argument launch_pdl was specified but unrecognised")
            self.launches.append((grid, args, kwargs))
        return run


def test_dependent_launch_and_its_fallback(monkeypatch) -> None:
    monkeypatch.setitem(dependent_launch.ENABLED, "value", True)
    kernel = FakeKernel(accepts_pdl=True)
    dependent_launch.launch(kernel, (3,), 1, 2, pdl=True, BLOCK=4)
    assert kernel.launches == [((3,), (1, 2), {"PDL": True, "launch_pdl": True, "BLOCK": 4})]
    old = FakeKernel(accepts_pdl=False)
    dependent_launch.launch(old, (3,), 1, pdl=True, BLOCK=4)
    assert old.launches == [((3,), (1,), {"PDL": True, "BLOCK": 4})]  # griddepcontrol.wait returns at once
    assert dependent_launch.ENABLED["value"] is False  # and the next kernels launch plain
    plain = FakeKernel(accepts_pdl=True)
    dependent_launch.launch(plain, (1,), pdl=False)
    assert plain.launches == [((1,), (), {"PDL": False})]


def test_not_off_the_gpu() -> None:
    assert not dependent_launch.applies(torch.device("cpu"))
