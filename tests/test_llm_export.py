"""llm.onnx: KV-cache decoder (+ ApET stage 2) in ONNX Runtime vs Hugging Face and the two-stage reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from apet.manifest import read_manifest
from apet.modeling.compat import cache_kwargs
from apet.modeling.reference import Reference, positions_from_mask

HIDDEN, LAYERS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16


class OrtDecoder:
    """Drives llm.onnx through prefill and decode, keeping the presents as the next pasts."""

    def __init__(self, path: Path) -> None:
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.past: list[np.ndarray] = []

    def step(self, embeds: np.ndarray, positions: np.ndarray, mask: np.ndarray,
             image_start: np.ndarray | None = None) -> dict[str, np.ndarray]:
        batch = embeds.shape[0]
        if not self.past:
            self.past = [np.zeros((batch, KV_HEADS, 0, HEAD_DIM), embeds.dtype) for _ in range(2 * LAYERS)]
        feed = {"inputs_embeds": embeds, "position_ids": positions, "attention_mask": mask}
        if "image_start" in self.inputs:
            feed["image_start"] = image_start
        feed.update({name: value for name, value in zip(self.inputs[len(feed):], self.past)})
        result = dict(zip(self.outputs, self.session.run(None, feed)))
        self.past = [result[name] for name in self.outputs if name.startswith("present_")]
        return result


def _prompt(batch: int, lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random embeddings and their mask (rows of different lengths)."""
    total = max(lengths)
    embeds = torch.randn(batch, total, HIDDEN, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(batch, total, dtype=torch.long)
    for b, length in enumerate(lengths):
        mask[b, total - length:] = 1
    return embeds, mask


def _hf_greedy(adapter, embeds: torch.Tensor, mask: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[list[int]]]:
    """HF LlamaModel + lm_head with its own cache and masks: prefill logits and greedy tokens."""
    from transformers import DynamicCache

    lm, head, table = adapter.model.model.language_model, adapter.lm_head(), adapter.embed_tokens()
    cache = DynamicCache()
    with torch.no_grad():
        hidden = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask),
                    **cache_kwargs(lm, cache), use_cache=True).last_hidden_state
        first = head(hidden[:, -1:])
        logits, tokens = first, []
        for _ in range(steps):
            token = logits[:, -1].argmax(-1)
            tokens.append(token.tolist())
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            hidden = lm(inputs_embeds=table(token)[:, None], attention_mask=mask,
                        position_ids=positions_from_mask(mask)[:, -1:], **cache_kwargs(lm, cache),
                        use_cache=True).last_hidden_state
            logits = head(hidden)
    return first, tokens


def _ort_greedy(path: Path, adapter, embeds: torch.Tensor, mask: torch.Tensor, steps: int,
                image_start: torch.Tensor | None = None):
    runner = OrtDecoder(path)
    table = adapter.embed_tokens().weight.detach().numpy()
    start = None if image_start is None else image_start.numpy()
    result = runner.step(embeds.numpy(), positions_from_mask(mask).numpy(), mask.numpy(), start)
    first, logits, tokens, mask_np = result["logits"], result["logits"], [], mask.numpy()
    for _ in range(steps):
        token = logits[:, -1].argmax(-1)
        tokens.append(token.tolist())
        mask_np = np.concatenate([mask_np, np.ones_like(mask_np[:, :1])], axis=1)
        positions = positions_from_mask(torch.from_numpy(mask_np))[:, -1:].numpy()
        logits = runner.step(table[token][:, None], positions, mask_np, start)["logits"]
    return first, tokens, result, runner


@pytest.mark.parametrize("lengths", [[37], [37, 23]])
def test_single_stage_llm_matches_hugging_face(artifact_factory, tiny_adapter, lengths: list[int]) -> None:
    artifact = artifact_factory(ratio=0.11, stages=1)
    embeds, mask = _prompt(len(lengths), lengths, seed=len(lengths))
    want_first, want_tokens = _hf_greedy(tiny_adapter, embeds, mask, steps=16)
    got_first, got_tokens, result, _ = _ort_greedy(artifact / "llm.onnx", tiny_adapter, embeds, mask, steps=16)
    assert got_first.shape == (len(lengths), 1, 512)
    np.testing.assert_allclose(got_first, want_first.numpy(), rtol=1e-4, atol=1e-4 * float(want_first.abs().max()))
    assert got_tokens == want_tokens
    assert len(set(sum(got_tokens, []))) > 1  # the check is not vacuous: generations vary
    assert [result[f"present_key.{i}"].shape[2] for i in range(LAYERS)] == [max(lengths)] * LAYERS


def test_chunked_prefill_and_decode_regimes_match(artifact_factory, tiny_adapter) -> None:
    """T=10 prefill, then a T=3 chunk with P=10, then T=1 with P=13: every (T, P) regime against HF."""
    artifact = artifact_factory(ratio=0.11, stages=1)
    embeds, mask = _prompt(2, [14, 14], seed=3)
    lm, head = tiny_adapter.model.model.language_model, tiny_adapter.lm_head()
    with torch.no_grad():
        full = head(lm(inputs_embeds=embeds, attention_mask=mask,
                       position_ids=positions_from_mask(mask)).last_hidden_state)
    runner = OrtDecoder(artifact / "llm.onnx")
    positions = positions_from_mask(mask).numpy()
    for lo, hi in [(0, 10), (10, 13), (13, 14)]:
        out = runner.step(embeds[:, lo:hi].numpy(), positions[:, lo:hi], mask[:, :hi].numpy())
        np.testing.assert_allclose(out["logits"][:, 0], full[:, hi - 1].numpy(), rtol=1e-4, atol=1e-4)


def test_all_logits_option(artifact_factory, tiny_adapter) -> None:
    artifact = artifact_factory(ratio=0.11, stages=1, all_logits=True)
    embeds, mask = _prompt(1, [12], seed=5)
    out = OrtDecoder(artifact / "llm.onnx").step(embeds.numpy(), positions_from_mask(mask).numpy(), mask.numpy())
    lm, head = tiny_adapter.model.model.language_model, tiny_adapter.lm_head()
    with torch.no_grad():
        want = head(lm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state)
    np.testing.assert_allclose(out["logits"], want.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lengths", [[70], [70, 55]])
def test_two_stage_llm_matches_reference(artifact_factory, tiny_adapter, lengths: list[int]) -> None:
    artifact = artifact_factory(ratio=0.11, stages=2)
    manifest = read_manifest(artifact)
    s2 = manifest.compression.stage2
    k1 = manifest.compression.stage1_keep
    assert (k1, s2.layer, s2.keep) == (40, 2, 16)
    embeds, mask = _prompt(len(lengths), lengths, seed=11)
    image_start = torch.tensor([max(lengths) - n + 6 for n in lengths])  # 6 text tokens, then K1 image tokens
    assert (manifest.compression.stage1.placement, s2.compression.placement) == ("mask", "rank")
    reference = Reference(tiny_adapter, manifest.compression.stage1, s2)
    want_first, state = reference.prefill(embeds, mask, image_start)
    got_first, got_tokens, result, runner = _ort_greedy(artifact / "llm.onnx", tiny_adapter, embeds, mask, 0,
                                                        image_start)
    np.testing.assert_array_equal(result["stage2_index"], state.stage2_index.numpy())
    np.testing.assert_allclose(got_first, want_first.numpy(), rtol=1e-4, atol=1e-4 * float(want_first.abs().max()))
    lengths_per_layer = [result[f"present_key.{i}"].shape[2] for i in range(LAYERS)]
    assert lengths_per_layer == reference.cache_lengths(state) == [max(lengths)] * 2 + [max(lengths) - 24] * 2

    # greedy decode, 12 steps, token for token
    table = tiny_adapter.embed_tokens().weight.detach()
    got_first, got_tokens, _, _ = _ort_greedy(artifact / "llm.onnx", tiny_adapter, embeds, mask, 12, image_start)
    logits, want_tokens = want_first, []
    for _ in range(12):
        token = logits[:, -1].argmax(-1)
        want_tokens.append(token.tolist())
        logits = reference.decode(table[token][:, None], state)
    assert got_tokens == want_tokens
    assert reference.cache_lengths(state)[-1] == max(lengths) - 24 + 12


@pytest.mark.trt
def test_fp16_llm_builds_with_prefill_and_decode_profiles(artifact_factory, rtx_api) -> None:
    from apet.engines.profiles import llm_profiles
    from apet.engines.trt import BuildOptions, build_engine

    artifact = artifact_factory(ratio=0.11, stages=2, dtype="fp16")
    manifest = read_manifest(artifact)
    profiles = llm_profiles(manifest, max_batch=2, max_context=256, max_prompt=128)
    assert [p.name for p in profiles] == ["prefill", "decode"]
    built = build_engine(rtx_api, artifact / "llm.onnx", profiles, BuildOptions(compute_capabilities=("sm86",)))
    assert built.inputs[0] == {"name": "inputs_embeds", "shape": [-1, -1, HIDDEN], "dtype": "half"}
    decode = profiles[1].shapes
    assert decode["inputs_embeds"][2] == (2, 1, HIDDEN)
    assert decode["past_key.0"][2][2] == 255 and decode["past_key.3"][2][2] == 255 - 24


def test_llm_graph_is_plain_onnx(artifact_factory) -> None:
    artifact = artifact_factory(ratio=0.11, stages=2)
    onnx.checker.check_model(str(artifact / "llm.onnx"), full_check=True)
    ops = {n.op_type for n in onnx.load(str(artifact / "llm.onnx")).graph.node}
    assert not {"Loop", "If", "Scan"} & ops and "Softmax" in ops and "TopK" in ops


def test_stage2_index_equals_numpy_reference_on_hidden_states(artifact_factory, tiny_adapter) -> None:
    """Acceptance (issue 12): stage2_index of llm.onnx == the float64 oracle (stage-2 placement) applied
    to the Hugging Face hidden states entering layer L over the K1-token image span."""
    import numpy_reference as ref

    artifact = artifact_factory(ratio=0.11, stages=2)
    plan = read_manifest(artifact).compression
    k1, s2 = plan.stage1_keep, plan.stage2
    lengths = [70, 58]
    embeds, mask = _prompt(len(lengths), lengths, seed=21)
    image_start = torch.tensor([max(lengths) - n + 6 for n in lengths])
    _, _, result, _ = _ort_greedy(artifact / "llm.onnx", tiny_adapter, embeds, mask, 0, image_start)
    lm = tiny_adapter.model.model.language_model
    with torch.no_grad():
        hidden = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask),
                    output_hidden_states=True).hidden_states[s2.layer]  # the input of layer L
    for row, start in enumerate(image_start.tolist()):
        span = hidden[row, start:start + k1].double().numpy()
        _, want = ref.compress_one(span, s2.keep, s2.compression.basis, placement="rank")
        np.testing.assert_array_equal(result["stage2_index"][row], want)
