"""apet.kernels.gemv: the skinny-matmul kernel against a float64 matmul (the GPU on a CUDA machine, Triton's CPU
interpreter elsewhere), and the dispatcher's promise: F.linear wherever the kernel is not eligible."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import run_interpreted

from apet.kernels import gemv

triton_missing = importlib.util.find_spec("triton") is None
# (rows, out features, in features, bias): decode rows 1 and 4, K not a multiple of the tile, a ragged N
CASES = [(1, 96, 256, False), (4, 40, 200, True), (16, 33, 512, True), (2, 70, 1100, False)]


def check(device: str, cases=CASES) -> None:
    for case, (rows, n, k, has_bias) in enumerate(cases):
        generator = torch.Generator().manual_seed(case)
        x = torch.randn(rows, k, generator=generator).half().to(device)
        w = torch.randn(n, k, generator=generator).half().to(device)
        b = torch.randn(n, generator=generator).half().to(device) if has_bias else None
        want = x.double() @ w.double().T + (b.double() if b is not None else 0)
        for config in gemv.CONFIGS:
            if config.form == "rows" and rows != 1:  # the rows form takes one row of x; dot takes any
                continue
            got = gemv.kernel_matmul(x, w, b, config).double()
            # fp32 accumulation, one fp16 rounding of the output
            torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="the compiled kernel needs a CUDA GPU (the interpreter test below covers it on CPU)")
def test_kernel_on_the_gpu() -> None:
    check("cuda")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    w = torch.randn(11008, 4096, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(gemv.linear(x, w), F.linear(x, w), rtol=2e-3, atol=5e-2)
    compiled = torch.compile(lambda a: gemv.linear(a, w), dynamic=False)  # through apet::skinny_linear
    torch.testing.assert_close(compiled(x), F.linear(x, w), rtol=2e-3, atol=5e-2)
    picked = gemv.choice(x, w, None)
    assert picked is gemv.CUBLAS or torch.equal(compiled(x), gemv.kernel_matmul(x, w, None, picked))


@pytest.mark.skipif(triton_missing, reason="Triton is not installed here (CUDA builds of torch ship it)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the compiled kernel instead")
def test_kernel_in_the_triton_interpreter(tmp_path: Path) -> None:
    run_interpreted(tmp_path, "import test_gemv as t\nt.check('cpu', t.CASES[:3])\n")


def test_plain_linear_off_the_gpu_and_for_wide_inputs() -> None:
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 3, 64), torch.randn(32, 64), torch.randn(32)
    assert torch.equal(gemv.linear(x, w, b), F.linear(x, w, b))  # CPU: exactly F.linear
    assert not gemv._eligible(torch.randn(40, 64), w)
    assert [c.fits(1) for c in gemv.CONFIGS] == [c.form == "rows" for c in gemv.CONFIGS]
    assert [c.fits(4) for c in gemv.CONFIGS] == [c.form == "dot" for c in gemv.CONFIGS]
    with pytest.raises(ValueError, match="one row"):
        gemv.kernel_matmul(torch.randn(2, 64), w, None, gemv.Config(8, 64, 4, 2, "rows"))
