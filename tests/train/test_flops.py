"""FLOP formula and MFU against numbers worked out by hand."""

from __future__ import annotations

import pytest

from charllm.modelcat import get
from charllm.train.flops import (
    active_matmul_params,
    hardware_flops_per_token,
    model_flops_per_token,
    peak_flops,
    utilisation,
)


def test_gpt3_1_3b_by_hand() -> None:
    m = get("gpt3-1.3b")  # 24 layers, h 2048, ffn 8192, vocab 50257
    per_layer = 4 * 2048 * 2048 + 2 * 2048 * 8192  # q,k,v,o + fc1,fc2
    n = 24 * per_layer + 50257 * 2048  # + output layer
    assert active_matmul_params(m) == n
    assert model_flops_per_token(m, 2048) == 6 * n + 12 * 24 * 2048 * 2048
    assert hardware_flops_per_token(m, 2048, recompute=True) == 8 * n + 16 * 24 * 2048 * 2048
    assert hardware_flops_per_token(m, 2048, recompute=False) == model_flops_per_token(m, 2048)
    assert hardware_flops_per_token(m, 2048, recompute="full") == 8 * n + 16 * 24 * 2048 * 2048
    assert hardware_flops_per_token(m, 2048, recompute="selective") == 6 * n + 16 * 24 * 2048 * 2048
    assert hardware_flops_per_token(m, 2048, recompute="none") == model_flops_per_token(m, 2048)
    with pytest.raises(ValueError, match="recompute"):
        hardware_flops_per_token(m, 2048, recompute="partial")


def test_moe_counts_top_k_experts_and_router() -> None:
    m = get("mixtral-8x7b")  # 32 layers, h 4096, 8 kv heads of 128, ffn 14336, 8 experts, top 2
    attn = 2 * 4096 * 4096 + 2 * 4096 * 1024
    mlp = 3 * 4096 * 14336 * 2 + 4096 * 8
    assert active_matmul_params(m) == 32 * (attn + mlp) + 32000 * 4096


def test_mfu_on_the_h100_reference_run() -> None:
    # tests/data/gpu/h100-gpt3-1.3b: 65536 tokens per step, median step 1.10687 s
    m = get("gpt3-1.3b")
    mfu = utilisation(model_flops_per_token(m, 2048), 65536 / 1.1068698167800903, 1, peak_flops("h100", "bf16"))
    assert mfu == pytest.approx(0.5431892450243038, rel=1e-12)


def test_no_peak_on_cpu() -> None:
    assert peak_flops("cpu", "fp32") is None
    assert utilisation(1.0, 1.0, 1, None) is None
