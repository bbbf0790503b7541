"""Under ``torch.compile`` the static decoder's prefill computes its rotary tables once
(apet.runtime.static_decoder.computed_once): an opaque copy that Inductor cannot inline into the consumers, where on
the GPU it recomputed sin and cos inside every layer's q and k rotation (3.5 of 48.4 ms of Qwen2.5-VL-7B's
2,065-token prefill on the H200; on by default since timed, ``static_decoder.ROTARY_ONCE``; scripts/gpu_profile.py
``:rotaryeach`` turns it off). Checked on the tiny Qwen2.5-VL adapter's M-RoPE tables: the compiled code takes the
tables through the copy and rotates with the values eager computes; eagerly nothing is copied; switched off, no
copy."""

from __future__ import annotations

import pytest
import torch

from apet.modeling.blocks import apply_rotary
from apet.runtime import static_decoder
from apet.runtime.static_decoder import computed_once

LAYERS = 3


def _layers(adapter):
    def run(h: torch.Tensor, positions: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        cos, sin = computed_once(*adapter.rotary(h, positions))
        for weight in weights:  # each "layer" rotates its q, then a matmul (its own kernel) makes the next one's
            x = apply_rotary(x, cos, sin) @ weight
        return x

    return run


@pytest.mark.parametrize("enabled", [True, False], ids=["once", "inductor-decides"])
def test_compiled_prefill_computes_the_rotary_tables_once(tiny_qwen_adapter, monkeypatch, enabled: bool) -> None:
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setitem(static_decoder.ROTARY_ONCE, "value", enabled)
    adapter, spec = tiny_qwen_adapter, tiny_qwen_adapter.spec.decoder
    generator = torch.Generator().manual_seed(0)
    tokens = 12
    h = torch.randn(1, tokens, spec.hidden_size, generator=generator)
    positions = torch.stack([torch.arange(tokens), torch.arange(tokens) // 2, torch.arange(tokens) % 5])[:, None]
    x = torch.randn(1, spec.num_heads, tokens, spec.head_dim, generator=generator)
    weights = [torch.randn(spec.head_dim, spec.head_dim, generator=generator) / spec.head_dim ** 0.5
               for _ in range(LAYERS)]
    tables = adapter.rotary(h, positions)
    assert all(a is b for a, b in zip(computed_once(*tables), tables))  # eagerly: the tables themselves

    torch._dynamo.reset()
    compiled = torch.compile(_layers(adapter), dynamic=False, fullgraph=True)
    got, code = run_and_get_code(compiled, h, positions, x, weights)
    torch.testing.assert_close(got, _layers(adapter)(h, positions, x, weights), rtol=1e-5, atol=1e-5)
    calls = "\n".join(code).count("torch.ops.apet.computed_once.default(")
    assert calls == (2 if enabled else 0), calls  # cos and sin, each once, whatever the number of layers


def test_the_compiled_static_prefill_takes_its_tables_once_and_equals_eager(tiny_qwen_adapter, monkeypatch) -> None:
    """The static decoder's whole prefill (tiny Qwen2.5-VL, M-RoPE positions) compiled: the tables pass through the
    copy once (cos and sin), and the logits equal the eager prefill's."""
    from torch._inductor.utils import run_and_get_code

    from apet.runtime.static_decoder import StaticDecoder

    monkeypatch.setitem(static_decoder.ROTARY_ONCE, "value", True)
    spec, tokens = tiny_qwen_adapter.spec.decoder, 20
    embeds = torch.randn(1, tokens, spec.hidden_size, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, tokens, dtype=torch.long)
    positions = torch.stack([torch.arange(tokens), torch.arange(tokens) // 3, torch.arange(tokens) % 4])[:, None]
    decoder = StaticDecoder(tiny_qwen_adapter, None, max_batch=1, max_context=64)
    want = decoder.prefill(embeds, mask, positions, None, padding="none")
    torch._dynamo.reset()
    compiled = torch.compile(lambda e, m, p: decoder.prefill(e, m, p, None, padding="none"), dynamic=False)
    got, code = run_and_get_code(compiled, embeds, mask, positions)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "\n".join(code).count("torch.ops.apet.computed_once.default(") == 2
