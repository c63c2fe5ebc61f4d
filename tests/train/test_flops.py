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


# Megatron-Kwai (ATC'24) artifact README (../shared/seeds/megatron-kwai-atc24-README.md): tokens per
# second per GPU and the MFU it prints. Llama-7B s=12288 on 4 GPUs (A800 312, H800 989 TFLOP/s),
# Llama-175B s=8192 on 256 H800 (Table 8).
KWAI_PUBLISHED = [
    ("llama-7b", 12288, "a800", 3016, 47.7),  # baseline (full ckpt)
    ("llama-7b", 12288, "a800", 3803, 60.1),  # ours
    ("llama-7b", 12288, "a800", 2847, 45.0),  # origin Megatron-LM
    ("llama-7b", 12288, "h800", 6639, 33.1),
    ("llama-7b", 12288, "h800", 8273, 41.2),
    ("llama-7b", 12288, "h800", 6138, 30.6),
    ("llama-175b", 8192, "h800", 299, 33.4),
    ("llama-175b", 8192, "h800", 387, 43.2),
    ("llama-175b", 8192, "h800", 278, 31.0),
]


@pytest.mark.parametrize(("model", "seq", "gpu", "tok_s_gpu", "published"), KWAI_PUBLISHED)
def test_mfu_causal_reproduces_kwai(model: str, seq: int, gpu: str, tok_s_gpu: float, published: float) -> None:
    from charllm.train.flops import causal_model_flops_per_token

    m = get(model)
    mfu = utilisation(causal_model_flops_per_token(m, seq), tok_s_gpu, 1, peak_flops(gpu, "bf16"))
    assert mfu is not None
    print(f"{model} s={seq} {gpu} {tok_s_gpu} tok/s/GPU: mfu_causal {100 * mfu:.3f} % (published {published} %)")
    assert abs(100 * mfu - published) <= 0.05
    # our mfu counts the full attention square: always higher than Kwai's on the same run
    mfu_full = utilisation(model_flops_per_token(m, seq), tok_s_gpu, 1, peak_flops(gpu, "bf16"))
    assert mfu_full is not None and mfu_full > mfu


def test_causal_flops_and_kwai_recompute_by_hand() -> None:
    from charllm.train.flops import causal_model_flops_per_token

    m = get("llama-7b")  # 32 layers, h 4096, MHA, ffn 11008, vocab 32000
    n = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 32000 * 4096
    assert active_matmul_params(m) == n
    assert causal_model_flops_per_token(m, 12288) == 6 * n + 6 * 32 * 4096 * 12288
    assert hardware_flops_per_token(m, 12288, recompute="kwai") == model_flops_per_token(m, 12288)


def test_step_metrics_reports_mfu_causal() -> None:
    from charllm.train.metrics import StepRecord, step_metrics

    m = get("llama-7b")
    # four measured steps of 16 x 12288 tokens on 4 GPUs at 8273 tok/s/GPU
    dt = 16 * 12288 / (4 * 8273)
    recs = [StepRecord(i, "measure", i * dt, (i + 1) * dt, 5.0, 16 * 12288) for i in range(4)]
    out = step_metrics(
        recs, shape=m, seq_len=12288, global_batch=16, world_size=4, gpu_type="h100", precision="bf16", recompute="kwai"
    )
    assert out["tokens_per_s_per_gpu"] == pytest.approx(8273)
    assert round(100 * out["mfu_causal"], 1) == 41.2
    assert out["mfu"] > out["mfu_causal"]
    assert out["hfu"] == pytest.approx(out["mfu"])  # kwai recompute runs no matmul again
    out_cpu = step_metrics(
        recs, shape=m, seq_len=12288, global_batch=16, world_size=4, gpu_type="cpu", precision="fp32", recompute="none"
    )
    assert "mfu" not in out_cpu and "mfu_causal" not in out_cpu
