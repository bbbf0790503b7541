"""The decoder seam (apet.modeling.decoder_block): one layer for the exported graph and the static GPU path, with
q/k RMSNorm (Qwen3) and per-layer injected visual inputs (DeepStack), checked against Hugging Face modules on a
tiny seeded Qwen3 text model saved and loaded through from_pretrained. No family is needed: a minimal adapter
over ``Qwen3ForCausalLM`` stands in for one."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from apet.contracts.specs import ModelSpec
from apet.modeling.adapter import VisionLanguageAdapter, describe_decoder

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 3, 64, 4, 2, 32, 96


class Qwen3TextAdapter(VisionLanguageAdapter):
    """Just the language side of an adapter, over a Hugging Face Qwen3 causal LM."""

    family = "test-qwen3-text"

    def decoder_layers(self):
        return list(self.model.model.layers)

    def final_norm(self):
        return self.model.model.norm

    def lm_head(self):
        return self.model.lm_head

    def embed_tokens(self):
        return self.model.model.embed_tokens

    def rotary(self, hidden, position_ids):
        return self.model.model.rotary_emb(hidden, position_ids)

    def save_text_assets(self, out_dir: Path) -> list[str]:
        return []


@pytest.fixture(scope="module")
def qwen3_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded tiny Qwen3 (tied embeddings, GQA, head_dim != hidden/heads) with non-trivial q/k norm weights."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                         max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=True,
                         rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # Hugging Face initialises norms to ones: make a skipped q/k norm visible
                param.copy_(1 + 0.3 * torch.randn_like(param))
    path = tmp_path_factory.mktemp("qwen3") / "tiny-qwen3"
    model.save_pretrained(path)
    return path


def _adapter(path: Path, injected_layers: int = 0) -> Qwen3TextAdapter:
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    decoder = describe_decoder(model.config, injected_layers=injected_layers)
    spec = ModelSpec(family=Qwen3TextAdapter.family, source=str(path), n_tokens=4, patch_grid=(2, 2),
                     vision_dim=HIDDEN, image_token_id=VOCAB - 1, bos_token_id=None, eos_token_ids=(VOCAB - 2,),
                     pad_token_id=0, prompt_template="{prompt}<image>", image_placeholder="<image>",
                     decoder=decoder, processor={})
    return Qwen3TextAdapter(model, spec, path)


def _prompt(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids [2, 9] with the first row left-padded by 2, its mask and Hugging Face's positions."""
    ids = torch.randint(1, VOCAB - 2, (2, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids[0, :2] = 0
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, positions


def _ort_session(adapter, tmp_path: Path, name: str) -> ort.InferenceSession:
    from apet.export.llm import export_llm

    path = export_llm(adapter, None, tmp_path / name, opset=17)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, embeds, positions, mask, past=None, injected=None):
    """One llm.onnx step: (last-position logits [B, V], presents)."""
    names = [i.name for i in session.get_inputs()]
    batch = embeds.shape[0]
    past = past or [np.zeros((batch, KV_HEADS, 0, HEAD_DIM), np.float32) for _ in range(2 * LAYERS)]
    feed = {"inputs_embeds": embeds, "position_ids": positions, "attention_mask": mask}
    if injected is not None:
        feed["injected_embeds"], feed["injected_rows"] = injected
    feed.update(zip([n for n in names if n.startswith("past_")], past))
    outputs = session.run(None, feed)
    return outputs[0][:, -1], outputs[1:]


# -- q/k norm ----------------------------------------------------------------------------------------------------
def test_spec_records_qk_norm_from_the_checkpoint(qwen3_checkpoint: Path) -> None:
    adapter = _adapter(qwen3_checkpoint)
    assert adapter.spec.decoder.qk_norm is True
    assert adapter.lm_head().weight.data_ptr() == adapter.embed_tokens().weight.data_ptr()  # tied


def test_block_refuses_a_spec_that_contradicts_the_checkpoint(qwen3_checkpoint: Path) -> None:
    from apet.modeling.blocks import HeadLayout
    from apet.modeling.decoder_block import DecoderBlock

    adapter = _adapter(qwen3_checkpoint)
    with pytest.raises(ValueError, match="q/k norms"):
        DecoderBlock(adapter.decoder_layers()[0], HeadLayout.of(adapter), qk_norm=False)


def test_exported_qk_norm_decoder_equals_hugging_face(qwen3_checkpoint: Path, tmp_path: Path) -> None:
    """llm.onnx in ONNX Runtime: prefill and two decode steps give the logits of the HF model's own forward over
    the same ids (left padding, GQA, tied head)."""
    adapter = _adapter(qwen3_checkpoint)
    session = _ort_session(adapter, tmp_path, "llm.onnx")
    ids, mask, positions = _prompt(1)
    table = adapter.embed_tokens().weight.detach()
    got, past = _run(session, table[ids].numpy(), positions.numpy(), mask.numpy())
    with torch.no_grad():
        want = adapter.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
    for step in range(2):
        token = torch.from_numpy(got.argmax(-1))
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        got, past = _run(session, table[token][:, None].numpy(), positions[:, -1:].numpy(), mask.numpy(), past)
        with torch.no_grad():
            want = adapter.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4, err_msg=f"decode step {step}")


@pytest.mark.parametrize("fuse", [False, True])
def test_static_decoder_with_qk_norm_equals_hugging_face(qwen3_checkpoint: Path, fuse: bool) -> None:
    """The static-cache path (eager on CPU; ``fuse``: the fused q/k/v and gate/up projections of the GPU path)."""
    from apet.runtime.static_decoder import StaticDecoder

    adapter = _adapter(qwen3_checkpoint)
    decoder = StaticDecoder(adapter, None, max_batch=2, max_context=32, fuse=fuse)
    ids, mask, positions = _prompt(2)
    table = adapter.embed_tokens().weight.detach()
    got = decoder.prefill(table[ids], mask, positions, None)
    with torch.no_grad():
        want = adapter.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    token = got.argmax(-1)
    ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    got = decoder.decode(table[token][:, None], positions[:, -1:])
    with torch.no_grad():
        want = adapter.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# -- injected per-layer inputs -------------------------------------------------------------------------------------
def _injection(seed: int, batch: int, length: int, layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, N, H] injected rows and a [B, T] row map: row 0's tokens 3..5 and row 1's tokens 1..4 are visual,
    their rows numbered in the flattened order (row 0 first), one visual row left unused."""
    rows = torch.full((batch, length), -1, dtype=torch.long)
    rows[0, 3:6] = torch.arange(3)
    rows[1, 1:5] = torch.arange(3, 7)
    injected = torch.randn(layers, 8, HIDDEN, generator=torch.Generator().manual_seed(seed))
    return injected, rows


def _hf_injected_logits(adapter, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                        injected: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Hugging Face's decoder layers with the rows added after layer i < L, token by token (the way Qwen3-VL's
    ``_deepstack_process`` adds visual features to the hidden states at visual positions)."""
    model = adapter.model.model
    hidden = model.embed_tokens(ids)
    length = ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal[None, None] & mask.bool()[:, None, None, :]
    bias = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    cos_sin = model.rotary_emb(hidden, positions)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            out = layer(hidden, attention_mask=bias, position_ids=positions, position_embeddings=cos_sin)
            hidden = (out[0] if isinstance(out, tuple) else out).clone()
            if i < injected.shape[0]:
                for b in range(ids.shape[0]):
                    for t in range(length):
                        if rows[b, t] >= 0:
                            hidden[b, t] += injected[i, rows[b, t]]
        return adapter.model.lm_head(model.norm(hidden))[:, -1]


def test_exported_injected_inputs_equal_hugging_face_layers(qwen3_checkpoint: Path, tmp_path: Path) -> None:
    """llm.onnx with injected_embeds [L, N, H] / injected_rows [B, T]: the logits of HF layers plus the rows after
    layer i < L; a decode step after it (N = 0, rows -1) continues from the injected cache."""
    adapter = _adapter(qwen3_checkpoint, injected_layers=2)
    session = _ort_session(adapter, tmp_path, "llm_injected.onnx")
    names = [i.name for i in session.get_inputs()]
    assert names[3:5] == ["injected_embeds", "injected_rows"]
    ids, mask, positions = _prompt(3)
    injected, rows = _injection(4, *ids.shape, layers=2)
    table = adapter.embed_tokens().weight.detach()
    got, past = _run(session, table[ids].numpy(), positions.numpy(), mask.numpy(),
                     injected=(injected.numpy(), rows.numpy()))
    want = _hf_injected_logits(adapter, ids, mask, positions, injected, rows)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
    plain = _hf_injected_logits(adapter, ids, mask, positions, injected[:0], rows)
    assert not np.allclose(got, plain.numpy(), atol=1e-2)  # the injection changes the answer

    token = torch.from_numpy(got.argmax(-1))
    ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    none = (np.zeros((2, 0, HIDDEN), np.float32), np.full((2, 1), -1, np.int64))
    got, _ = _run(session, table[token][:, None].numpy(), positions[:, -1:].numpy(), mask.numpy(), past, none)
    rows = torch.cat([rows, torch.full((2, 1), -1)], 1)
    want = _hf_injected_logits(adapter, ids, mask, positions, injected, rows)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


def test_static_decoder_and_reference_apply_injected_inputs(qwen3_checkpoint: Path) -> None:
    """The static-cache path and the torch backend's HF-module reference take the same injected inputs."""
    from apet.modeling.reference import Reference
    from apet.runtime.static_decoder import StaticDecoder

    adapter = _adapter(qwen3_checkpoint, injected_layers=3)
    ids, mask, positions = _prompt(5)
    injected, rows = _injection(6, *ids.shape, layers=3)
    want = _hf_injected_logits(adapter, ids, mask, positions, injected, rows)
    table = adapter.embed_tokens().weight.detach()
    decoder = StaticDecoder(adapter, None, max_batch=2, max_context=32)
    torch.testing.assert_close(decoder.prefill(table[ids], mask, positions, None, injected, rows), want,
                               rtol=1e-4, atol=1e-4)
    reference = Reference.__new__(Reference)  # the language side only: no family, no vision stages
    reference.adapter, reference.stage2, reference.layers = adapter, None, adapter.decoder_layers()
    logits, _ = reference.prefill(table[ids], mask, torch.zeros(2, dtype=torch.long), positions, injected, rows)
    torch.testing.assert_close(logits[:, -1], want, rtol=1e-4, atol=1e-4)


def test_second_stage_and_injected_inputs_are_refused_together(qwen3_checkpoint: Path) -> None:
    from apet.contracts.plan import Budget, plan_for
    from apet.errors import UsageError

    class Facts:
        name, max_stages, stage1_placement, dynamic_tokens = "test", 2, "mask", False

    spec = _adapter(qwen3_checkpoint, injected_layers=2).spec
    spec = replace(spec, n_tokens=64)
    with pytest.raises(UsageError, match="--stages 1"):
        plan_for(spec, Facts(), Budget(ratio=0.5, stages=2))
    assert plan_for(spec, Facts(), Budget(ratio=0.5, stages=2), clamp_stages=True).stage2 is None


# -- the plumbing: manifests, vision outputs ----------------------------------------------------------------------
def test_manifests_without_the_new_decoder_fields_still_load(qwen3_checkpoint: Path) -> None:
    import json

    from apet.manifest import _model_from_json

    data = json.loads(json.dumps(_adapter(qwen3_checkpoint, injected_layers=2).spec.to_json()))
    assert data["decoder"]["qk_norm"] is True and data["decoder"]["injected_layers"] == 2
    assert _model_from_json(data).decoder.injected_layers == 2
    for key in ("qk_norm", "injected_layers"):
        del data["decoder"][key]
    old = _model_from_json(data).decoder
    assert (old.qk_norm, old.injected_layers) == (False, 0)


def test_vision_outputs_concatenate_injected_rows_in_run_order() -> None:
    from apet.runtime.backends.base import VisionOutput, concatenate_outputs, injected_inputs

    rng = np.random.default_rng(0)
    runs = [VisionOutput.of({"visual_embeds": rng.normal(size=(n, 4)), "keep_index": np.arange(n)[None],
                             "injected_embeds": rng.normal(size=(2, n, 4))}) for n in (3, 5)]
    both = concatenate_outputs(runs)
    np.testing.assert_array_equal(both.embeds, np.concatenate([r.embeds for r in runs]))
    np.testing.assert_array_equal(both.injected, np.concatenate([r.injected for r in runs], axis=1))
    rows = np.array([[-1, 0, 1, 2, -1], [3, 4, 5, 6, 7]])
    injected, got_rows = injected_inputs(both.injected, 2, rows)
    assert injected.shape == (2, 8, 4) and got_rows.dtype == np.int64
    assert VisionOutput.of({"visual_embeds": runs[0].embeds, "keep_index": np.arange(3)}).injected is None


@pytest.mark.trt
def test_injected_llm_profiles_and_tensorrt_rtx_build(qwen3_checkpoint: Path, artifact_factory, rtx_api,
                                                      tmp_path: Path) -> None:
    """Engine profiles give injected_embeds 0 rows up to every visual row of a full batch at prefill and none at
    decode (the same dims the TensorRT backend binds); TensorRT-RTX builds the graph with them."""
    from apet.contracts.onnx_graph import graph_io
    from apet.engines.profiles import llm_profiles
    from apet.engines.trt import BuildOptions, build_engine
    from apet.export.llm import export_llm
    from apet.manifest import read_manifest
    from apet.models.registry import family_of
    from apet.runtime.backends.tensorrt import StepShapes

    adapter = _adapter(qwen3_checkpoint, injected_layers=2)
    path = export_llm(adapter, None, tmp_path / "llm.onnx", opset=17)
    inputs, outputs = ([spec.to_json() for spec in specs] for specs in graph_io(path))
    base = read_manifest(artifact_factory(ratio=0.11, stages=1))  # any family's artifact: its visual token counts
    plan = replace(base.compression, stage2=None)
    manifest = replace(base, model=replace(base.model, decoder=adapter.spec.decoder), compression=plan,
                       graphs={**base.graphs, "llm": replace(base.graphs["llm"], inputs=inputs, outputs=outputs)})
    prefill, decode = llm_profiles(manifest, max_batch=2, max_context=256, max_prompt=200)
    visual = family_of(manifest).max_visual_tokens(manifest)
    assert [s[1] for s in prefill.shapes["injected_embeds"]] == [0, family_of(manifest).typical_visual_tokens(
        manifest), 2 * visual]
    assert prefill.shapes["injected_rows"][2] == (2, 200)
    assert decode.shapes["injected_embeds"] == ((2, 0, HIDDEN),) * 3 and decode.shapes["injected_rows"][2] == (2, 1)
    step = StepShapes(manifest, batch=2, seq=9, past=0, rows=7).inputs()
    assert step["injected_embeds"] == (2, 7, HIDDEN) and step["injected_rows"] == (2, 9)
    built = build_engine(rtx_api, path, [prefill, decode], BuildOptions(compute_capabilities=("sm86",)))
    names = [spec["name"] for spec in built.inputs]
    assert names[3:5] == ["injected_embeds", "injected_rows"]
