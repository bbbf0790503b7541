"""apet/kernels/fused_gemv.py: the one-row projections with the norm, silu·mul and residual add folded in, against a
float64 computation of the Hugging Face formulas and against the unfused kernels; a Llama decoder layer through
FusedLayer (project_qkv, finish) against its Hugging Face modules, the fused kernels counted. Triton's interpreter
runs them on CPU (a subprocess); a GPU runs them compiled, and under torch.compile as the custom ops."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import run_interpreted

triton_missing = importlib.util.find_spec("triton") is None
EPS = 1e-5
# (in features, out features): K neither a multiple of the tiles nor a power of two, a ragged N; K a tile multiple
SHAPES = [(200, 40), (1024, 24)]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Llama's RMSNorm as Hugging Face computes it: float32 statistics, rounded, then the weight product rounded."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(x.shape[-1], eps=EPS).to(x.device, x.dtype)
    norm.weight.data = weight
    return norm(x)


def _tolerance(dtype: torch.dtype, want: torch.Tensor) -> dict:
    scale = float(want.abs().max())
    return dict(rtol=1e-5, atol=1e-5 * scale) if dtype == torch.float32 else dict(rtol=4e-3, atol=4e-3 * scale)


def check_kernels(device: str, dtype: torch.dtype = torch.float16, configs: int = 2, rows: int = 1) -> None:
    """Each folded kernel on ``rows`` rows of x (one: the rows form; more: the dot form, a batch's decode step)."""
    from triton.runtime.errors import OutOfResources

    from apet.kernels import activations, decoder_fused, fused_gemv, gemv

    form_configs = [config for config in gemv.CONFIGS if config.fits(rows)][:configs]
    silu_ran = 0
    for case, (depth, width) in enumerate(SHAPES):
        generator = torch.Generator().manual_seed(case)

        def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
            return (torch.randn(*shape, generator=generator) * scale).to(device, dtype)

        # rows of different scales: each row's own RMS must be applied
        x = rand(rows, 1, depth, scale=3.0) * torch.arange(1, rows + 1).to(device, dtype)[:, None, None]
        scale, weight, bias = rand(depth), rand(width, depth), rand(width)
        packed, residual = rand(2 * width, depth), rand(rows, 1, width)
        normed = _rms_norm(x, scale)
        want_linear = normed.double() @ weight.double().T + bias.double()
        gate, up = (normed.double() @ packed.double().T).to(dtype).double().split(width, dim=-1)
        want_silu = gate / (1 + torch.exp(-gate)) * up
        want_residual = residual.double() + (x.double() @ weight.double().T).to(dtype).double()
        for config in form_configs:
            got = fused_gemv.norm_linear_kernel(x, scale, EPS, weight, bias, config)
            assert got.shape == (rows, 1, width) and got.dtype == dtype
            torch.testing.assert_close(got.double(), want_linear, **_tolerance(dtype, want_linear))
            unfused = gemv.kernel_matmul(decoder_fused.add_rms_norm(x, scale, EPS)[1].reshape(rows, depth), weight,
                                         bias, config)
            torch.testing.assert_close(got.reshape(rows, width), unfused, **_tolerance(dtype, want_linear))
            got = fused_gemv.linear_residual_kernel(x, weight, residual, config)
            torch.testing.assert_close(got.double(), want_residual, **_tolerance(dtype, want_residual))
            try:
                got = fused_gemv.norm_gate_up_silu_kernel(x, scale, EPS, packed, config)
            except OutOfResources:  # the dot form stages a gate and an up tile: a large tile may not fit in shared
                continue  # memory on the GPU (folded_choice skips such a configuration too)
            silu_ran += 1
            assert got.shape == (rows, 1, width)
            torch.testing.assert_close(got.double(), want_silu, **_tolerance(dtype, want_silu))
            unfused = activations.silu_mul(gemv.kernel_matmul(normed.reshape(rows, depth), packed, None, config))
            torch.testing.assert_close(got.reshape(rows, width), unfused, **_tolerance(dtype, want_silu))
    assert silu_ran >= len(SHAPES)  # at least one configuration of each shape ran silu·up


@contextlib.contextmanager
def counted_launches() -> Iterator[list[dict]]:
    """The keyword arguments of every folded-kernel launch made inside the block, and its rows' width."""
    from apet.kernels import fused_gemv

    launches: list[dict] = []
    original = fused_gemv._launch

    def counted(*args, **kwargs):
        launches.append({**kwargs, "depth": int(args[0].shape[-1])})  # the folded rows' width
        return original(*args, **kwargs)

    fused_gemv._launch = counted
    try:
        yield launches
    finally:
        fused_gemv._launch = original


def _layer(dtype: torch.dtype, device: str):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                         rms_norm_eps=EPS, hidden_act="silu")
    layer = LlamaDecoderLayer(config, 0)
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        norm.weight.data = torch.randn(64)  # not all ones: the norm's weight must be applied
    return layer.to(device, dtype).eval()


def check_layer(device: str, dtype: torch.dtype) -> None:
    """FusedLayer at one and at three rows (a decode step of batch 3): the input norm + q/k/v and everything after
    attention equal the HF modules, through the fused kernels (counted); more rows than a decode batch (a prefill)
    take the unfused kernels and agree too."""
    from apet.kernels import fused_gemv
    from apet.runtime.fusion import FusedLayer

    layer = _layer(dtype, device)
    fused = FusedLayer(layer)
    attn, mlp = layer.self_attn, layer.mlp
    with torch.no_grad():  # on a GPU the first call of a shape times its configurations (uncounted here)
        for rows in (1, 3):
            warm = torch.randn(1, rows, 64).to(device, dtype)
            fused.project_qkv(warm), fused.finish(warm, warm)
    with counted_launches() as launches:
        with torch.no_grad():
            for rows in (1, 3, fused_gemv.MAX_ROWS + 1):
                generator = torch.Generator().manual_seed(rows)
                h = (torch.randn(1, rows, 64, generator=generator) * 2).to(device, dtype)
                attended = torch.randn(1, rows, 64, generator=generator).to(device, dtype)
                normed = layer.input_layernorm(h)
                want = torch.cat([attn.q_proj(normed), attn.k_proj(normed), attn.v_proj(normed)], dim=-1)
                got = fused.project_qkv(h)
                torch.testing.assert_close(got.double(), want.double(), **_tolerance(dtype, want.double()))
                h1 = h + attn.o_proj(attended)
                want = h1 + mlp(layer.post_attention_layernorm(h1))
                got = fused.finish(h, attended)
                torch.testing.assert_close(got.double(), want.double(), **_tolerance(dtype, want.double()))
                if rows <= fused_gemv.MAX_ROWS:  # norm+q/k/v, o+residual, norm+gate/up+silu·mul, down+residual
                    assert len(launches) == 4, launches
                    assert [bool(call.get("norm")) for call in launches] == [True, False, True, False]
                    assert launches[2]["up_rows"] == 96 and launches[3]["residual"] is not None
                    launches.clear()
        assert not launches  # a prefill's rows: none fused


def check_refused_folds(device: str, dtype: torch.dtype) -> None:
    """FusedLayer.finish where the timing refused some of its folds (recorded as fused_gemv.pick's None): each refused
    fold runs as the unfolded path instead (its kernel not launched), the others still fold, and the layer equals
    the HF modules whichever folds ran."""
    from apet.kernels import fused_gemv, gemv
    from apet.runtime.fusion import FusedLayer

    layer = _layer(dtype, device)
    fused = FusedLayer(layer)
    attn, mlp = layer.self_attn, layer.mlp
    generator = torch.Generator().manual_seed(7)
    h = (torch.randn(1, 2, 64, generator=generator) * 2).to(device, dtype)
    attended = torch.randn(1, 2, 64, generator=generator).to(device, dtype)
    o, gate_up, down = fused.o_weight, fused.gate_up_weights[0], fused.down_weight
    keys = {"o": ("residual", gemv.key_of((2, 64), tuple(o.shape), o.stride(0), False, dtype, h.device)),
            "silu": ("silu", gemv.key_of((2, 64), tuple(gate_up.shape), gate_up.stride(0), False, dtype, h.device)),
            "down": ("residual", gemv.key_of((2, 96), tuple(down.shape), down.stride(0), False, dtype, h.device))}
    with torch.no_grad():
        h1 = h + attn.o_proj(attended)
        want = (h1 + mlp(layer.post_attention_layernorm(h1))).double()
    saved = dict(fused_gemv._choices)
    try:
        for refused in ([], ["o"], ["silu"], ["down"], ["o", "silu", "down"]):
            fused_gemv._choices.clear()
            fused_gemv._choices.update({keys[name]: None for name in refused})
            with counted_launches() as launches, torch.no_grad():
                got = fused.finish(h, attended)
            # o + residual reads the attention output (64 wide), down + residual the MLP's (96), silu the normed h
            ran = ["silu" if call.get("up_rows") else {64: "o", 96: "down"}[call["depth"]] for call in launches]
            assert ran == [name for name in ("o", "silu", "down") if name not in refused], (refused, ran)
            torch.testing.assert_close(got.double(), want, **_tolerance(dtype, want))
    finally:
        fused_gemv._choices.clear()
        fused_gemv._choices.update(saved)


def check_decoder_steps(checkpoint: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        batch: int = 1) -> None:
    """The static decoder's decode steps at ``batch`` rows with the fused kernels (4 per layer and step, and the
    final norm with the LM head) equal it without fusion; its prefill (many rows per request) folds only the final
    norm of each request's last row."""
    from apet.adapters.llava.adapter import LlavaAdapter
    from apet.runtime.static_decoder import StaticDecoder

    adapter = LlavaAdapter.load(Path(checkpoint), dtype=dtype, device=device)
    hidden, layers = adapter.spec.decoder.hidden_size, adapter.spec.decoder.num_layers
    embeds = torch.randn(batch, 9, hidden, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    mask = torch.ones(batch, 9, dtype=torch.long, device=device)
    positions = torch.arange(9, device=device)[None].expand(batch, 9)
    if device != "cpu":  # the first call of a shape times its configurations (uncounted here)
        warm = StaticDecoder(adapter, None, max_batch=batch, max_context=32, fuse=True)
        warm.prefill(embeds, mask, positions, None)
        warm.decode(embeds[:, :1], positions[:, -1:] + 1, warm.span(9))
    with counted_launches() as launches:
        outs = []
        for fuse in (False, True):
            decoder = StaticDecoder(adapter, None, max_batch=batch, max_context=32, fuse=fuse)
            steps = [decoder.prefill(embeds, mask, positions, None)]
            assert len(launches) == (1 if fuse else 0)
            for i in range(2):
                step = torch.randn(batch, 1, hidden, generator=torch.Generator().manual_seed(20 + i)).to(device, dtype)
                steps.append(decoder.decode(step, positions[:, -1:] + 1 + i, decoder.span(9 + i)))
            outs.append(steps)
    assert len(launches) == 1 + (4 * layers + 1) * 2
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got.double(), want.double(), **_tolerance(dtype, want.double()))


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="the compiled kernels need a CUDA GPU (the interpreter test below covers them on CPU)")
def test_fused_kernels_on_the_gpu(tiny_checkpoint: Path, monkeypatch) -> None:
    from apet.kernels import dependent_launch, fused_gemv
    from apet.runtime.fusion import FusedLayer

    # the launches are counted below: every tiny shape folds, whatever its timing against the unfused kernels
    monkeypatch.setattr(fused_gemv, "UNFUSED_MARGIN", float("inf"))

    check_kernels("cuda", torch.float16, configs=5)
    check_kernels("cuda", torch.bfloat16, configs=5)
    check_layer("cuda", torch.float16)
    check_kernels("cuda", torch.float16, configs=6, rows=4)
    check_kernels("cuda", torch.bfloat16, configs=6, rows=2)
    check_decoder_steps(str(tiny_checkpoint), "cuda", torch.float16)
    check_decoder_steps(str(tiny_checkpoint), "cuda", torch.float16, batch=4)
    layer = _layer(torch.float16, "cuda")
    fused = FusedLayer(layer)
    h = torch.randn(1, 1, 64, device="cuda", dtype=torch.float16)
    attended = torch.randn(1, 1, 64, device="cuda", dtype=torch.float16)
    with torch.no_grad():  # as the decoder runs (the custom ops have no backward)
        eager = (fused.project_qkv(h), fused.finish(h, attended))
        compiled = torch.compile(lambda a, b: (fused.project_qkv(a), fused.finish(a, b)), dynamic=False)(h, attended)
    for got, want in zip(compiled, eager):  # the custom ops run the same kernels with the same configurations
        assert torch.equal(got, want)
    dependent_launch.ENABLED["value"] = not dependent_launch.ENABLED["value"]
    try:  # launched as programmatic dependents or not: the same bits
        with torch.no_grad():
            other = (fused.project_qkv(h), fused.finish(h, attended))
    finally:
        dependent_launch.ENABLED["value"] = not dependent_launch.ENABLED["value"]
    for got, want in zip(other, eager):
        assert torch.equal(got, want)
    down = layer.mlp.down_proj.weight
    assert fused_gemv.applies(h, down) and fused_gemv.applies(h.expand(1, fused_gemv.MAX_ROWS, 64), down)
    assert not fused_gemv.applies(h.expand(1, fused_gemv.MAX_ROWS + 1, 64), down)


@pytest.mark.skipif(triton_missing, reason="Triton is not installed here (CUDA builds of torch ship it)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the compiled kernels instead")
def test_fused_kernels_in_the_triton_interpreter(tmp_path: Path, tiny_checkpoint: Path) -> None:
    run_interpreted(tmp_path, "import torch, test_fused_gemv as t\n"
                    "t.check_kernels('cpu', torch.float16)\nt.check_kernels('cpu', torch.float32, configs=1)\n"
                    "t.check_layer('cpu', torch.float32)\nt.check_layer('cpu', torch.float16)\n"
                    "t.check_refused_folds('cpu', torch.float32)\n"
                    "t.check_kernels('cpu', torch.float16, rows=3)\n"
                    "t.check_kernels('cpu', torch.float32, configs=1, rows=8)\n"
                    f"t.check_decoder_steps({str(tiny_checkpoint)!r})\n"
                    f"t.check_decoder_steps({str(tiny_checkpoint)!r}, batch=3)\n")


def test_a_fold_gives_way_only_to_clearly_faster_unfused_kernels() -> None:
    from apet.kernels import fused_gemv, gemv

    small, large = gemv.Config(4, 512, 4, 3, "rows"), gemv.Config(8, 512, 4, 3, "rows")
    timed = {small: 10.0, large: 9.0}
    assert fused_gemv.pick(timed, None) == large  # nothing to compare with: the fastest fold
    assert fused_gemv.pick(timed, 8.9) == large  # the unfused kernels within the margin: the fold (one boundary less)
    assert fused_gemv.pick(timed, 9.0 / (1 + fused_gemv.UNFUSED_MARGIN) - 0.01) is None  # clearly faster: unfused
    assert fused_gemv.pick({}, 1.0) is None  # no configuration compiled


def test_a_refused_fold_is_decided_before_the_trace(monkeypatch) -> None:
    """fused_gemv.folds: a shape not yet timed folds, a timed fold folds, a fold the timing refused does not; under
    torch.compile Dynamo takes the same answer as a constant when it traces (the lookup is not traced)."""
    from apet.kernels import fused_gemv, gemv

    monkeypatch.setattr(fused_gemv, "applies", lambda x, weight: True)
    monkeypatch.setattr(fused_gemv, "_choices", {})
    x, weight = torch.randn(1, 3, 64), torch.randn(40, 64)
    key = ("residual", gemv.key_of((3, 64), (40, 64), 64, False, x.dtype, x.device))

    def folded(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return a @ w.T + 1 if fused_gemv.folds("residual", a, w) else a @ w.T - 1

    assert fused_gemv.folds("residual", x, weight)  # not timed yet
    fused_gemv._choices[key] = gemv.CONFIGS[0]
    assert fused_gemv.folds("residual", x, weight) and fused_gemv.folds("norm", x, weight)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(folded, backend="eager")(x, weight), x @ weight.T + 1)
    fused_gemv._choices[key] = None  # refused
    assert not fused_gemv.folds("residual", x, weight)
    assert fused_gemv.folds("residual", x.expand(2, 3, 64), weight)  # another shape: its own choice
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(folded, backend="eager")(x, weight), x @ weight.T - 1)
    torch._dynamo.reset()


def test_compile_measured_runs_the_call_eagerly_once_before_the_trace(monkeypatch) -> None:
    """apet.runtime.compiled.compile_measured: the first call runs the function eagerly (the kernels time their
    choices on real tensors) and then compiled; later calls only compiled."""
    from apet.runtime.compiled import compile_measured

    eager_calls = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            eager_calls.append(x.shape)
        return x * 2

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", lambda f, **kw: torch._dynamo.optimize("eager")(f))
    call = compile_measured(fn)
    x = torch.ones(3)
    torch.testing.assert_close(call(x), x * 2)
    torch.testing.assert_close(call(x), x * 2)
    assert eager_calls == [x.shape]
    torch._dynamo.reset()


@pytest.mark.parametrize("mode, torch_mode", [("default", None), ("max-autotune", "max-autotune-no-cudagraphs")])
def test_compile_measured_passes_the_compile_mode_without_inductors_cuda_graphs(monkeypatch, mode, torch_mode) -> None:
    """``--compile-mode max-autotune`` reaches torch.compile as Inductor's mode without its own CUDA graphs (apet
    captures every stage itself); the default passes no mode at all; an unknown mode is refused before compiling."""
    from apet.errors import UsageError
    from apet.runtime.compiled import compile_measured

    seen = []
    monkeypatch.setattr(torch, "compile", lambda f, **kw: seen.append(kw) or f)
    call = compile_measured(lambda x: x + 1, mode)
    torch.testing.assert_close(call(torch.ones(2)), torch.full((2,), 2.0))
    assert seen == [{"dynamic": False, **({"mode": torch_mode} if torch_mode else {})}]
    with pytest.raises(UsageError, match="compile mode 'autotune' is unknown.*default, max-autotune"):
        compile_measured(lambda x: x, "autotune")
    assert len(seen) == 1


def test_nothing_folds_off_the_gpu_without_the_interpreter(monkeypatch) -> None:
    """On CPU (no interpreter) the fused layer is the unfused modules' computation exactly."""
    from apet.kernels import fused_gemv
    from apet.runtime.fusion import FusedLayer

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = _layer(torch.float32, "cpu")
    fused = FusedLayer(layer)
    h, attended = torch.randn(1, 1, 64), torch.randn(1, 1, 64)
    assert not fused_gemv.applies(h, layer.mlp.down_proj.weight)
    with torch.no_grad():
        h1 = h + layer.self_attn.o_proj(attended)
        torch.testing.assert_close(fused.finish(h, attended), h1 + layer.mlp(layer.post_attention_layernorm(h1)),
                                   rtol=1e-6, atol=1e-6)  # gate and up as one matmul: the CPU's blocking may differ
        normed = layer.input_layernorm(h)
        want = torch.cat([F.linear(normed, p.weight) for p in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                                 layer.self_attn.v_proj)], dim=-1)
        torch.testing.assert_close(fused.project_qkv(h), want, rtol=0, atol=1e-6)
