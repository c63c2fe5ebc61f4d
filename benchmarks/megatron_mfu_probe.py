"""Which megatron-core settings reach what MFU on one GPU (GPT-3 1.3B, seq 2048, mb 8, gb 32, bf16).

A probe for the megatron engine's defaults, standalone (megatron-core only, no charllm
engine code), so that it measures megatron-core's own pieces: ``Float16Module`` (bf16
weights), Megatron's ``DistributedDataParallel`` (fp32 main gradients in its grad buffer)
and ``get_megatron_optimizer`` (the distributed optimizer, fp32 main parameters), against
the engine's former fp32-weights-under-autocast path. Each variant trains ``--warm`` steps,
then times ``--steps`` steps with CUDA synchronisation; MFU = (6 N + 12 L h s) tokens/s over
989 TFLOP/s (charllm.train.flops).

    python3 benchmarks/megatron_mfu_probe.py --variants autocast,bf16,bf16-fusedadam,bf16-compile
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.nn.functional as F

from charllm import modelcat
from charllm.train.flops import model_flops_per_token

PEAK = 989e12


def sdpa_attention_cls():  # the engine's SDPA core attention, restated so the probe stands alone
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class Sdpa(DotProductAttention):
        def forward(
            self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
        ):
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
            s, b = out.shape[2], out.shape[0]
            return out.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)

    return Sdpa


def build(variant: str, shape: modelcat.ModelShape, seq: int):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    bf16 = variant != "autocast"
    cfg = TransformerConfig(
        num_layers=shape.n_layers,
        hidden_size=shape.hidden,
        num_attention_heads=shape.n_heads,
        ffn_hidden_size=shape.ffn_hidden,
        kv_channels=shape.head_dim,
        add_bias_linear=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_func=F.gelu,
        normalization="LayerNorm",
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        masked_softmax_fusion=False,
        bias_activation_fusion="fusion" in variant,
        bias_dropout_fusion="fusion" in variant,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention.submodules.core_attention = sdpa_attention_cls()
    vocab = -(-shape.vocab_size // 128) * 128
    model = GPTModel(
        config=cfg,
        transformer_layer_spec=spec,
        vocab_size=vocab,
        max_sequence_length=seq,
        share_embeddings_and_output_weights=False,
        position_embedding_type="learned_absolute",
    ).cuda()
    if "compile" in variant:
        for layer in model.decoder.layers:
            layer.forward = torch.compile(layer.forward)
    if not bf16:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        return cfg, model, opt, vocab
    from megatron.core import optimizer as mopt
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    model = Float16Module(cfg, model)
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True, overlap_grad_reduce=False
    )
    model = DistributedDataParallel(cfg, ddp_cfg, model)
    if "fusedadam" in variant:
        mopt.Adam = functools.partial(torch.optim.AdamW, fused=True)  # type: ignore[attr-defined]
    ocfg = OptimizerConfig(
        optimizer="adam",
        lr=1e-4,
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        bf16=True,
        use_distributed_optimizer=True,
        clip_grad=1.0,
    )
    opt = get_megatron_optimizer(ocfg, [model], use_gloo_process_groups=False)
    return cfg, model, opt, vocab


def run(variant: str, args: argparse.Namespace) -> float:
    shape = modelcat.get("gpt3-1.3b")
    seq, mb, accum = 2048, args.mb, args.gb // args.mb
    _cfg, model, opt, _vocab = build(variant, shape, seq)
    pos = torch.arange(seq, device="cuda").unsqueeze(0).expand(mb, -1)
    gen = torch.Generator(device="cuda").manual_seed(1)
    batches = [torch.randint(0, shape.vocab_size, (mb, seq + 1), device="cuda", generator=gen) for _ in range(accum)]
    bf16 = variant != "autocast"

    def step() -> float:
        if bf16:
            model.zero_grad_buffer()
        opt.zero_grad()
        tot = 0.0
        for b in batches:
            x, y = b[:, :-1], b[:, 1:]
            if bf16:
                loss = model(x, pos, None, labels=y).float().mean() / accum
            else:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(x, pos, None, labels=y).float().mean() / accum
            loss.backward()
            tot += float(loss.detach()) if args.sync_loss else 0.0
        if bf16:
            from megatron.core.distributed import finalize_model_grads

            finalize_model_grads([model])
        opt.step()
        return tot

    for _ in range(args.warm):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    tok = args.gb * seq / dt
    mfu = model_flops_per_token(shape, seq) * tok / PEAK
    mem = torch.cuda.max_memory_allocated() / 2**30
    print(
        f"{variant:24s} step {dt * 1e3:8.1f} ms  tokens/s {tok:9.0f}  MFU {mfu:.4f}  max mem {mem:6.1f} GiB", flush=True
    )
    return mfu  # model and optimizer go with this frame; main() collects them


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="autocast,bf16,bf16-fusedadam,bf16-fusion-fusedadam,bf16-fusedadam-compile")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--mb", type=int, default=8)
    ap.add_argument("--gb", type=int, default=32)
    ap.add_argument("--sync-loss", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    import megatron.core

    print(
        f"torch {torch.__version__}, megatron-core {megatron.core.__version__}, {torch.cuda.get_device_name()}",
        flush=True,
    )
    res = {}
    for v in args.variants.split(","):
        try:
            res[v] = run(v, args)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        except Exception as err:  # report and go on to the next variant
            import traceback

            traceback.print_exc()
            print(f"{v:24s} FAILED: {type(err).__name__}: {str(err)[:300]}", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
    print("== summary")
    for v, m in res.items():
        print(f"{v:24s} MFU {m:.4f}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
