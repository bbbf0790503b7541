"""How far each attention form's kernels in ONNX Runtime are from exact arithmetic (run by hand; a CUDA machine
with onnxruntime-gpu for the CUDA execution provider, the CPU provider otherwise).

Each form's attention and rotary call, exported on its own through the project's exporter
(:func:`apet.export.attention.attention_kernel`, :func:`apet.export.onnx_utils.export_onnx`) at LLaVA-1.5-7B
shapes, fed the same random inputs: the opset-23 ``Attention`` / ``RotaryEmbedding`` nodes of ``--attention op`` and
the MatMul - additive mask - Softmax - MatMul / rotate-half graphs of ``--attention pattern``. Each output is compared
with a float64 NumPy computation of the same formula, so the two forms' rounding is measured on its own, without a
model's near-ties amplifying it (that is scripts/attention_forms_gpu.py).

  python scripts/attention_kernel_error.py --out kernel_error.json [--dtype fp16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from apet.contracts.targets import OP_FORM_OPSET, PATTERN_OPSET
from apet.export.attention import attention_kernel
from apet.export.onnx_utils import export_onnx
from apet.modeling.blocks import HeadLayout

# (name, batch, q heads, kv heads, query length, key length, head dim, causal)
CASES = [
    ("decoder prefill", 1, 32, 32, 640, 640, 128, True),
    ("decoder decode", 4, 32, 32, 1, 700, 128, True),
    ("vision", 2, 16, 16, 577, 577, 64, False),
    ("grouped prefill (Qwen-7B)", 1, 28, 4, 640, 640, 128, True),
]


class _Attend(nn.Module):
    """One form's ``attend`` (mask: boolean for ``op``, additive for ``pattern``, as the decoder builds them)."""

    def __init__(self, form: str, layout: HeadLayout) -> None:
        super().__init__()
        self.kernel = attention_kernel(form, layout)

    def forward(self, q, k, v, mask):
        return self.kernel.attend(q, k, v, mask)


class _Rotate(nn.Module):
    """One form's RoPE from full-width [B, S, D] tables (``op`` passes their halves to ``RotaryEmbedding``)."""

    def __init__(self, form: str, layout: HeadLayout) -> None:
        super().__init__()
        self.kernel = attention_kernel(form, layout)

    def forward(self, x, cos, sin):
        return self.kernel.rotate(x, *self.kernel.tables(cos, sin))


def _session(module: nn.Module, form: str, feeds: dict[str, np.ndarray], scratch: Path, providers: list[str]):
    import onnxruntime as ort

    path = scratch / f"{type(module).__name__}_{form}.onnx"
    args = tuple(torch.from_numpy(v) for v in feeds.values())
    export_onnx(module, args, path, input_names=list(feeds), output_names=["y"], dynamic_axes={},
                opset=OP_FORM_OPSET if form == "op" else PATTERN_OPSET)
    return ort.InferenceSession(str(path), providers=providers)


def reference_attention(q, k, v, allowed, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    scores = np.where(allowed, (q @ k.transpose(0, 1, 3, 2)) * scale, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def _errors(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    diff = got.astype(np.float64) - want
    return {"max_abs": float(np.abs(diff).max()), "rms": float(np.sqrt((diff**2).mean())),
            "rms_of_reference": float(np.sqrt((want**2).mean()))}


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--input-std", type=float, default=1.5, help="std of q and k (score std ~ std^2)")
    parser.add_argument("--small", action="store_true", help="shrink every case (a quick CPU check)")
    args = parser.parse_args()
    np_dtype = np.float16 if args.dtype == "fp16" else np.float32
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    rng = np.random.default_rng(0)
    report: dict = {"dtype": args.dtype, "providers": providers, "ort": ort.__version__, "attention": {}}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for name, b, hq, hkv, s, t, d, causal in CASES:
            if args.small:
                b, hq, hkv, s, t = 1, hq // 4 or 1, max(hkv // 4, 1), min(s, 48), min(t, 48)
            layout = HeadLayout(hq, hkv, d)
            q = (rng.standard_normal((b, hq, s, d)) * args.input_std).astype(np_dtype)
            k = (rng.standard_normal((b, hkv, t, d)) * args.input_std).astype(np_dtype)
            v = rng.standard_normal((b, hkv, t, d)).astype(np_dtype)
            keys, queries = np.arange(t)[None], (np.arange(s) + t - s)[:, None]
            allowed = np.broadcast_to((keys <= queries) if causal else np.ones((s, t), bool), (b, 1, s, t)).copy()
            bias = np.where(allowed, 0, np.finfo(np_dtype).min).astype(np_dtype)
            want = reference_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), allowed,
                                       d**-0.5)
            row = report["attention"][name] = {"shape": [b, hq, hkv, s, t, d]}
            for form, mask in (("op", allowed), ("pattern", bias)):
                feeds = {"q": q, "k": k, "v": v, "mask": mask}
                got = _session(_Attend(form, layout), form, feeds, scratch, providers).run(None, feeds)[0]
                row[form] = _errors(got, want)
            print(f"{name:28s} op max {row['op']['max_abs']:.2e} rms {row['op']['rms']:.2e} | pattern max "
                  f"{row['pattern']['max_abs']:.2e} rms {row['pattern']['rms']:.2e}")
        b, h, s, d = (1, 32, 640, 128) if not args.small else (1, 4, 48, 128)
        angles = np.arange(s, dtype=np.float64)[:, None] / (10000 ** (np.arange(0, d, 2, dtype=np.float64) / d))
        angles = np.broadcast_to(np.concatenate([angles, angles], axis=-1), (b, s, d))  # HF's full-width tables
        feeds = {"x": rng.standard_normal((b, h, s, d)).astype(np_dtype), "cos": np.cos(angles).astype(np_dtype),
                 "sin": np.sin(angles).astype(np_dtype)}
        xd, c, sn = (feeds[n].astype(np.float64) for n in ("x", "cos", "sin"))
        x1, x2 = xd[..., : d // 2], xd[..., d // 2:]
        c, sn = c[:, None, :, : d // 2], sn[:, None, :, : d // 2]
        want = np.concatenate([x1 * c - x2 * sn, x2 * c + x1 * sn], axis=-1)
        layout = HeadLayout(h, h, d)
        report["rotary"] = {"shape": [b, h, s, d]} | {
            form: _errors(_session(_Rotate(form, layout), form, feeds, scratch, providers).run(None, feeds)[0], want)
            for form in ("op", "pattern")}
    print(f"{'rotary':28s} op max {report['rotary']['op']['max_abs']:.2e} | pattern max "
          f"{report['rotary']['pattern']['max_abs']:.2e}")
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
