"""Kernel names (recorded on H100/H200 and CPU) land in the right category."""

from __future__ import annotations

from charllm.train.profiling import breakdown, categorise, to_csv


def test_categories_of_real_kernel_names() -> None:
    cases = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1": "matmul",
        "nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NTN": "matmul",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>": "attention",
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "all-reduce",
        "ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "reduce-scatter",
        "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "all-gather",
        "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)": "send/recv",
        "triton_red_fused_native_layer_norm_0": "other",
        "aten::addmm": "matmul",
        "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
        "c10d::allreduce_": "all-reduce",
        "gloo:all_gather": "all-gather",
    }
    for name, cat in cases.items():
        assert categorise(name) == cat, name


def test_breakdown_fractions() -> None:
    rows = breakdown([("nvjet_x", 3.0, 10), ("flash_fwd", 1.0, 2), ("triton_poi", 1.0, 5)])
    by = {r["category"]: r for r in rows}
    assert by["matmul"]["fraction"] == 0.6 and by["attention"]["count"] == 2
    assert to_csv(rows).splitlines()[0] == "category,time_s,fraction,count"


def test_recorded_h100_breakdown_file() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "data/gpu/h100-gpt3-1.3b/kernels_rank0.csv").read_text()
    rows = {line.split(",")[0]: float(line.split(",")[2]) for line in text.splitlines()[1:]}
    assert rows["matmul"] > 0.5 and rows["attention"] > 0.05 and abs(sum(rows.values()) - 1) < 1e-5
