"""The fused GPU path of ApET (apet/kernels/apet_fused.py) against the float64 oracle: same kept indices,
values within float32 tolerance, for every placement. Runs on a CUDA device (the GPU device in CI-less
runs); on a CPU machine with Triton installed, a small case runs in Triton's interpreter instead."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy_reference as ref
import pytest
import torch

from apet.compression import FUSED, compress
from apet.contracts.compression import PLACEMENTS

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused ApET kernel runs on a CUDA GPU")
triton_missing = importlib.util.find_spec("triton") is None

# (batch, N, D, keep, basis) including LLaVA-1.5 (576 x 1024), LLaVA-NeXT views and Video-LLaVA frames
CASES = [(1, 576, 1024, 96, 10), (1, 576, 1024, 64, 10), (2, 576, 1024, 192, 10), (8, 256, 4096, 32, 10),
         (4, 96, 4096, 32, 10), (2, 144, 64, 32, 10), (3, 64, 48, 54, 10), (1, 300, 40, 100, 16)]


def _features(case: int, batch: int, n: int, d: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(50 + case)
    x = torch.randn(batch, n, 16, generator=generator) @ torch.randn(16, d, generator=generator) / 4
    return (x + 0.5 * torch.randn(batch, n, d, generator=generator)).to(device)


def _check(device: str, cases: list) -> None:
    for case, (batch, n, d, keep, basis) in enumerate(cases):
        x = _features(case, batch, n, d, device)
        for placement in PLACEMENTS:
            got = compress(x, keep=keep, basis=basis, placement=placement)
            want_tokens, want_index = ref.compress(x.double().cpu().numpy(), keep, basis, placement=placement)
            np.testing.assert_array_equal(got.index.cpu().numpy(), want_index, err_msg=f"{case} {placement}")
            np.testing.assert_allclose(got.tokens.double().cpu().numpy(), want_tokens, rtol=1e-4,
                                       atol=1e-5 * float(x.abs().max()))


@pytest.fixture()
def fused_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel for every N (the library uses it up to FUSED["max_tokens"] only)."""
    monkeypatch.setitem(FUSED, "max_tokens", None)


@gpu
def test_fused_path_matches_the_float64_oracle_on_gpu(fused_everywhere) -> None:
    assert FUSED["enabled"]
    _check("cuda", CASES)


@gpu
def test_fused_path_under_cuda_graph_capture(fused_everywhere) -> None:
    from apet.runtime.cuda_graphs import GraphedCall

    x = _features(0, 2, 576, 1024, "cuda")
    call = GraphedCall(lambda t: compress(t, keep=96).index, {"t": x})
    _, want = ref.compress(x.double().cpu().numpy(), 96, 10)
    np.testing.assert_array_equal(call(t=x).cpu().numpy(), want)


@pytest.mark.skipif(triton_missing, reason="Triton is not installed here (CUDA builds of torch ship it)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the compiled kernel (the tests above) instead")
def test_fused_path_in_the_triton_interpreter(tmp_path: Path) -> None:
    """The same kernel run by Triton's CPU interpreter on small cases (a subprocess: the interpreter is chosen
    when the kernel is defined)."""
    script = tmp_path / "run.py"
    script.write_text("import test_kernels as t\nt.FUSED['max_tokens'] = None\n"
                      "t._check('cpu', [c for c in t.CASES if c[1] * c[2] <= 20000])\n")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
