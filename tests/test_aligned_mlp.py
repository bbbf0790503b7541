"""apet.modeling.aligned_mlp: the fused, padded gated MLP equals the Hugging Face module it replaces."""

import torch
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP

from apet.modeling.aligned_mlp import aligned_gated_mlp, is_gated_mlp


def test_padded_fused_mlp_equals_the_module_and_leaves_it_unchanged():
    torch.manual_seed(0)
    config = Qwen2_5_VLVisionConfig(hidden_size=48, intermediate_size=90, hidden_act="silu")  # 90: not 64-aligned
    mlp = Qwen2_5_VLMLP(config, bias=True).double()
    x = torch.randn(3, 7, 48, dtype=torch.float64)
    before = mlp(x)
    assert is_gated_mlp(mlp)
    fused = aligned_gated_mlp(mlp)
    assert fused.padded == 128 and fused.gate_up.shape == (256, 48) and fused.down.shape == (48, 128)
    torch.testing.assert_close(fused(x), before, rtol=0, atol=1e-12)
    torch.testing.assert_close(mlp(x), before, rtol=0, atol=1e-12)  # the module reads views of the same storage
    assert mlp.gate_proj.weight.data_ptr() == fused.gate_up.data_ptr()
    assert aligned_gated_mlp(mlp) is fused
