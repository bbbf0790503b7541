"""apet/kernels/decoder_fused.py (RMSNorm + residual add, rotary) against the Hugging Face modules and the
decoder's torch rotary, and the static decoder with them against the decoder without. Triton's interpreter runs the
kernels on CPU (a subprocess: the interpreter is chosen when the kernels are defined); a GPU runs them compiled."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from triton_interpreter import run_interpreted

triton_missing = importlib.util.find_spec("triton") is None
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels run compiled on a CUDA GPU")


def check_kernels(device: str) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from apet.kernels import decoder_fused
    from apet.modeling.blocks import apply_rotary

    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)  # one ulp
        hidden = 96  # not a power of two: the padded lanes must not count
        norm = LlamaRMSNorm(hidden, eps=1e-5)
        norm.weight.data = torch.randn(hidden, generator=generator)
        norm = norm.to(device, dtype)
        x = (torch.randn(2, 5, hidden, generator=generator) * 3).to(device, dtype)
        delta = torch.randn(2, 5, hidden, generator=generator).to(device, dtype)
        assert decoder_fused.rms_norm_of(norm) is not None
        total, normed = decoder_fused.add_rms_norm(x, norm.weight, 1e-5, delta)
        torch.testing.assert_close(total, x + delta, rtol=0, atol=0)
        torch.testing.assert_close(normed, norm(x + delta), **tol)  # the mean's float32 sum order only
        same, alone = decoder_fused.add_rms_norm(x, norm.weight, 1e-5)
        assert torch.equal(same, x)
        torch.testing.assert_close(alone, norm(x), **tol)

        heads, kv_heads, dim, length = 4, 2, 16, 7
        qkv = torch.randn(2, length, (heads + 2 * kv_heads) * dim, generator=generator).to(device, dtype)
        angles = torch.randn(2, length, dim // 2, generator=generator)
        cos, sin = (torch.cat([f(angles)] * 2, -1).to(device, dtype) for f in (torch.cos, torch.sin))
        q, k, v = decoder_fused.rotary(qkv, cos, sin, heads, kv_heads, dim)
        view = qkv.view(2, length, heads + 2 * kv_heads, dim).transpose(1, 2)
        want_q = apply_rotary(view[:, :heads], cos, sin)
        want_k = apply_rotary(view[:, heads:heads + kv_heads], cos, sin)
        # the same roundings as torch's ops; the GPU compiler may contract a product into a sum: one ulp
        torch.testing.assert_close(q, want_q, **tol)
        torch.testing.assert_close(k, want_k, **tol)
        assert torch.equal(v, view[:, heads + kv_heads:])
        assert q.transpose(1, 2).is_contiguous()  # token-major: the packed prefill packs it as a view

        # the prefill's cache write: token-major k (the rotary's output) and v (a view of qkv) into a head-major
        # cache at an offset, bit for bit; positions around the written rows untouched
        from apet.kernels import cache_write

        enabled, cache_write.ENABLED["value"] = cache_write.ENABLED["value"], True  # APET_CACHE_WRITE=0 aside
        try:
            for values in (k, v):
                cache = torch.randn(3, kv_heads, 40, dim, generator=generator).to(device, dtype)[:2]
                want = cache.clone()
                want[:, :, 5:5 + length] = values
                cache_write.write_rows(cache, values, 5)
                assert torch.equal(cache, want)
            wide = torch.randn(1, 2, 37, 24, generator=generator).to(device, dtype)  # > a block of rows, d not 2^n
            cache = torch.zeros(1, 2, 50, 24, dtype=dtype, device=device)
            cache_write.write_rows(cache, wide.transpose(1, 2).contiguous().transpose(1, 2), 0)
            assert torch.equal(cache[:, :, :37], wide) and not cache[:, :, 37:].any()
        finally:
            cache_write.ENABLED["value"] = enabled


def check_decoder(checkpoint: str) -> None:
    """The static decoder with fused projections and the kernels equals it without, prefill and decode."""
    from apet.adapters.llava.adapter import LlavaAdapter
    from apet.kernels import decoder_fused
    from apet.runtime.static_decoder import StaticDecoder

    adapter = LlavaAdapter.load(Path(checkpoint))
    hidden = adapter.spec.decoder.hidden_size
    generator = torch.Generator().manual_seed(1)
    embeds = torch.randn(2, 12, hidden, generator=generator)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    outs = []
    from apet.kernels import cache_write

    calls = {"norm": 0, "rotary": 0, "cache": 0}
    names = {"norm": (decoder_fused, "add_rms_norm"), "rotary": (decoder_fused, "rotary"),
             "cache": (cache_write, "_copy_rows")}
    for name, (module, attribute) in names.items():
        kernel = getattr(module, attribute)
        if name == "cache":  # a Triton kernel is launched by indexing it with its grid
            class Counted:
                def __getitem__(self, grid, _kernel=kernel):
                    calls["cache"] += 1
                    return _kernel[grid]

            setattr(module, attribute, Counted())
            continue

        def counted(*args, _kernel=kernel, _name=name, **kwargs):
            calls[_name] += 1
            return _kernel(*args, **kwargs)

        setattr(module, attribute, counted)
    for fuse in (False, True):
        decoder = StaticDecoder(adapter, None, max_batch=2, max_context=64, fuse=fuse)
        steps = [decoder.prefill(embeds, mask, positions, None)]
        for i in range(3):
            step = torch.randn(2, 1, hidden, generator=torch.Generator().manual_seed(10 + i))
            steps.append(decoder.decode(step, positions[:, -1:] + 1 + i, decoder.span(12 + i)))
        outs.append(steps)
    layers = adapter.spec.decoder.num_layers
    # the kernels ran: rotary in the prefill and 3 decode steps; the norm kernel in the prefill only, a decode step's
    # norms fold into its projections (apet.kernels.fused_gemv, tests/test_fused_gemv.py)
    # and the prefill's cache writes (keys and values of every layer) in both decoders: they do not depend on fuse
    assert calls == {"norm": 2 * layers, "rotary": layers * 4, "cache": 2 * 2 * layers}
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@gpu
def test_kernels_on_gpu() -> None:
    check_kernels("cuda")


@pytest.mark.skipif(triton_missing, reason="Triton is not installed here (CUDA builds of torch ship it)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the compiled kernels instead")
def test_kernels_and_decoder_in_the_triton_interpreter(tmp_path: Path, tiny_checkpoint: Path) -> None:
    run_interpreted(tmp_path, "import test_decoder_fused as t\nt.check_kernels('cpu')\n"
                    f"t.check_decoder({str(tiny_checkpoint)!r})\n")
