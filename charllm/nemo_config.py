"""A cell as NeMo 2.x configuration: plain values, no NeMo or torch import.

``engine: nemo`` (:mod:`charllm.train.engine_nemo`) builds NeMo's trainer, strategy, precision
plugin, optimizer, model config and data module from :func:`nemo_config`; the same dict is
what ``tests/golden/nemo/*.json`` hold for representative paper cells and what
``docs/nemo.md`` explains field by field against CharLLM-PPT's NeMo YAML. Keys are the
keyword arguments of the NeMo 2.7 / megatron-core 0.15 classes they feed:

- ``strategy``: ``nemo.lightning.MegatronStrategy``
- ``ddp``: ``megatron.core.distributed.DistributedDataParallelConfig`` (the strategy's ``ddp``)
- ``precision``: ``nemo.lightning.MegatronMixedPrecision``
- ``optimizer``: ``megatron.core.optimizer.OptimizerConfig`` (in ``nemo.lightning.MegatronOptimizerModule``)
- ``model``: ``nemo.collections.llm.GPTConfig`` (dtype and activation as names: ``"bfloat16"``, ``"gelu"``)
- ``data``: ``nemo.collections.llm.MockDataModule`` (synthetic cells)
- ``trainer``: ``nemo.lightning.Trainer``

Why NeMo 2.7.3: it is the last release line of ``nemo-toolkit`` that ships the LLM collection
(``nemo.collections.llm``: ``GPTModel``, ``GPTConfig``, ``MockDataModule``, ``llm.pretrain``);
3.0.0 (2026-08) removed it (the wheel holds no ``nemo/collections/llm``), the LLM recipes having
moved to Megatron-Bridge. It trains with megatron-core 0.15.3, not the megatron engine's 0.16.1:
2.7.3 calls ``get_megatron_optimizer(no_weight_decay_cond=...)``, removed in 0.16 (found by
running NeMo's trainer on a tiny cell on CPU; ``requirements-nemo.lock`` says more).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: the pinned release (requirements-nemo.lock)
NEMO_VERSION = "2.7.3"
MEGATRON_CORE_VERSION = "0.15.3"  # not engine megatron's 0.16.1: see requirements-nemo.lock
# the same optimiser numbers as the megatron engine (charllm.train.engine_megatron)
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8
CLIP_GRAD = 1.0
MOE_AUX_LOSS_COEFF = 0.01
ROPE_BASE = 500000
VOCAB_DIVISIBLE_BY = 128  # charllm.capabilities.VOCAB_PAD


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def nemo_config(cell: Any) -> dict[str, Any]:
    """The NeMo configuration of a job cell (a :class:`charllm.train.cell.CellSpec` or its dict).

    Deterministic and JSON-serialisable. Raises :class:`ValueError` for a cell engine ``nemo``
    cannot run (the capability table refuses the same cells at plan time).
    """
    model = _get(cell, "model")
    par = _get(cell, "parallel")
    opt = _get(cell, "opt")
    warm = _get(cell, "warmup")
    ds = _get(cell, "dataset")
    family = _get(model, "family")
    tp, pp, dp = int(_get(par, "tp", 1)), int(_get(par, "pp", 1)), int(_get(par, "dp", 1))
    cp, ep, vp = int(_get(par, "cp", 1)), int(_get(par, "ep", 1)), int(_get(par, "pp_virtual", 1))
    fsdp = bool(_get(par, "fsdp", False))
    micro, gbatch, seq = int(_get(cell, "micro_batch")), int(_get(cell, "global_batch")), int(_get(cell, "seq_len"))
    bf16 = _get(cell, "precision") == "bf16"
    overlap = bool(_get(opt, "overlap", False))
    recompute = _get(opt, "recompute_granularity", "full") if _get(opt, "recompute", False) else "none"
    if fsdp:
        raise ValueError("engine 'nemo': fsdp is not mapped (NeMo 2.7's torch-FSDP2 strategy is a different trainer)")
    if (_get(ds, "kind", "synthetic") or "synthetic") != "synthetic":
        raise ValueError("engine 'nemo': only synthetic data is mapped (charllm's indexed format is not NeMo's)")
    n_kv = int(_get(model, "n_kv_heads", 0) or 0) or int(_get(model, "n_heads"))
    heads, hidden = int(_get(model, "n_heads")), int(_get(model, "hidden"))
    gated = family in ("llama3", "mixtral")
    experts = int(_get(model, "num_experts", 0) or 0)
    dtype = "bfloat16" if bf16 else "float32"

    strategy = {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "virtual_pipeline_model_parallel_size": vp if vp > 1 else None,
        "context_parallel_size": cp,
        "expert_model_parallel_size": ep,
        "sequence_parallel": tp > 1,
        "pipeline_dtype": dtype if pp > 1 else None,
        "ckpt_load_optimizer": False,
        "ckpt_save_optimizer": False,
        # NeMo 2.7.3's async checkpoint IO imports megatron-core's tensorstore strategy, gone in
        # 0.16; created lazily (at teardown too), it failed every run's end; no checkpoints anyway
        "ckpt_async_save": False,
        "setup_optimizers": True,
    }
    ddp = {
        "grad_reduce_in_fp32": bf16,
        "overlap_grad_reduce": overlap,
        "overlap_param_gather": overlap,
        "use_distributed_optimizer": True,
        "check_for_nan_in_grad": False,
        "average_in_collective": True,
    }
    precision = {
        "precision": "bf16-mixed" if bf16 else "32",
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        "autocast_enabled": False,
        "grad_reduce_in_fp32": bf16,
    }
    optimizer = {
        "optimizer": "adam",
        "lr": float(_get(opt, "lr", 3e-4)),
        "min_lr": float(_get(opt, "lr", 3e-4)),
        "weight_decay": float(_get(opt, "weight_decay", 0.1)),
        "adam_beta1": ADAM_BETAS[0],
        "adam_beta2": ADAM_BETAS[1],
        "adam_eps": ADAM_EPS,
        "clip_grad": CLIP_GRAD,
        "bf16": bf16,
        "params_dtype": dtype,
        "use_distributed_optimizer": True,
        "overlap_param_gather_with_optimizer_step": False,
    }
    mcfg: dict[str, Any] = {
        "num_layers": int(_get(model, "n_layers")),
        "hidden_size": hidden,
        "ffn_hidden_size": int(_get(model, "ffn_hidden")),
        "num_attention_heads": heads,
        "num_query_groups": n_kv,
        "kv_channels": hidden // heads,
        "seq_length": seq,
        "vocab_size": int(_get(model, "vocab_size")),
        "make_vocab_size_divisible_by": VOCAB_DIVISIBLE_BY,
        "normalization": "RMSNorm" if gated else "LayerNorm",
        "activation_func": "silu" if gated else "gelu",
        "gated_linear_unit": gated,
        "add_bias_linear": not gated,
        "position_embedding_type": "rope" if gated else "learned_absolute",
        "rotary_base": ROPE_BASE,
        "share_embeddings_and_output_weights": False,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "layernorm_epsilon": 1e-5,
        "init_method_std": 0.02,
        "bf16": bf16,
        "params_dtype": dtype,
        "tp_comm_overlap": bool(overlap and tp > 1),
        "recompute_granularity": None if recompute == "none" else recompute,
        "recompute_method": "uniform" if recompute == "full" else None,
        "recompute_num_layers": 1 if recompute == "full" else None,
        "recompute_modules": ["core_attn"] if recompute == "selective" else None,
        "bias_activation_fusion": True,
        "bias_dropout_fusion": True,
        "masked_softmax_fusion": False,
        "apply_rope_fusion": False,
        "gradient_accumulation_fusion": False,
        "persist_layer_norm": False,
        "cross_entropy_loss_fusion": True,
        "cross_entropy_fusion_impl": "native",
    }
    if experts:
        mcfg.update(
            num_moe_experts=experts,
            moe_router_topk=int(_get(model, "top_k")),
            moe_ffn_hidden_size=int(_get(model, "ffn_hidden")),
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=False,
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=MOE_AUX_LOSS_COEFF,
        )
    max_warm = int(_get(warm, "max_steps", 20))
    steps = int(_get(cell, "steps"))
    # an upper bound: the step-boundary callback stops the trainer once the adaptive warm-up
    # and the measured steps are over (charllm.train.engine_nemo.StepBoundaries)
    max_steps = max_warm + steps
    data = {
        "seq_length": seq,
        "micro_batch_size": micro,
        "global_batch_size": gbatch,
        "num_train_samples": (max_steps + 2) * gbatch,
        "num_val_samples": 0,
        "num_test_samples": 0,
        "num_workers": 0,
        "pin_memory": True,
        "create_attention_mask": False,
    }
    world = tp * pp * dp * cp
    gpn = _get(_get(cell, "extra", {}) or {}, "gpus_per_node") or _get(cell, "gpus_per_node") or 8
    per_node = max(1, min(world, int(gpn)))
    trainer = {
        "devices": per_node,
        "num_nodes": max(1, world // per_node),
        "accelerator": "gpu",
        "max_steps": max_steps,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "val_check_interval": None,
        "log_every_n_steps": 1,
        "enable_checkpointing": False,
        "logger": False,
        "use_distributed_sampler": False,
        "enable_progress_bar": False,
    }
    return {
        "nemo": NEMO_VERSION,
        "megatron_core": MEGATRON_CORE_VERSION,
        "strategy": strategy,
        "ddp": ddp,
        "precision": precision,
        "optimizer": optimizer,
        "model": mcfg,
        "data": data,
        "trainer": trainer,
        "grad_accum": gbatch // (micro * dp),
    }
