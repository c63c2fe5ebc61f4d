"""The NeMo engine (``engine: nemo``): the cell trained by NeMo 2.7's LLM collection.

NeMo's Lightning trainer runs the training loop; charllm keeps the clock. NeMo 2.7.3 trains
with megatron-core 0.15.3 (its own environment, ``requirements-nemo.lock``), not 0.16.1. The job
(:class:`charllm.train.run.Job`) starts the NVML sampler and the Zeus window exactly as for
the other engines and hands them to :meth:`NemoEngine.train`, which builds, from
:func:`charllm.nemo_config.nemo_config` (the torch-free mapping, golden-tested):

- ``nemo.lightning.MegatronStrategy`` (tp/pp/vp/cp/ep, sequence parallel with tp > 1) with
  megatron-core's ``DistributedDataParallelConfig`` (distributed optimizer, overlapped grad
  reduce and param gather with ``opt.overlap``, fp32 grad reduction for bf16);
- ``nemo.lightning.MegatronMixedPrecision`` (bf16 params, fp32 main params and grads);
- ``nemo.lightning.MegatronOptimizerModule`` over megatron-core's ``OptimizerConfig``
  (Adam, betas 0.9/0.95, eps 1e-8, clip 1.0: the megatron engine's numbers; constant lr);
- ``nemo.collections.llm.GPTConfig``/``GPTModel`` shaped by the cell (gpt3: LayerNorm, GELU,
  biases, learned positions; llama3/mixtral: RMSNorm, SwiGLU, GQA, RoPE), recompute mapped to
  ``recompute_granularity``/``recompute_method``; the layer spec is NeMo's default (Transformer
  Engine) where TE imports, else charllm's local megatron-core spec with SDPA core attention
  (:mod:`charllm.train.megatron_spec`, the megatron engine's), since NeMo's own fallback uses
  an unfused attention that materialises the s x s scores;
- ``nemo.collections.llm.MockDataModule`` (synthetic tokens; indexed data is refused in the
  capability table) with a vocabulary-only tokenizer (:class:`VocabTokenizer`), its datasets
  built with the attention mask NeMo's forward step needs without TE (:func:`_mock_data_module`);
- ``nemo.lightning.Trainer`` with :class:`StepBoundaries` as a callback, no logger, no
  checkpoints, no validation.

:class:`StepBoundaries` records each optimizer step as the other engines' loop does
(``charllm.train.run.Job._train``): a step runs from the end of the previous one to the end
of this one (CUDA synchronised), on ``time.time()`` (the sampler's clock); the step time and
temperature slope are reduced over ranks (``reduce_step_stats``), fed to the same
:class:`~charllm.train.warmup.WarmupMonitor`, the Zeus window begins when the warm-up ends and
ends after the last measured step, when the callback stops the trainer. So ``steps.csv``,
``result.json`` and the telemetry Parquet come out of the same code as for every engine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from charllm.train.cell import CellSpec
from charllm.train.dist import DistEnv
from charllm.train.errors import EngineUnavailableError
from charllm.train.metrics import StepRecord
from charllm.train.warmup import WarmupMonitor


def _log(msg: str) -> None:
    print(msg, flush=True)


class StepBoundaries:
    """Lightning callback hooks that time optimizer steps on the telemetry's clock.

    Plain class (no Lightning import): :func:`lightning_callback` mixes it into
    ``lightning.pytorch.Callback`` on the nodes; the CPU tests drive the same hooks from a
    minimal loop. ``reduce(loss, local_s, slope) -> (loss, step_max_s, slope_max)``,
    ``sync()`` and ``temp_slope()`` are the job's (the same functions the other engines' loop calls).
    """

    def __init__(
        self,
        cell: CellSpec,
        rank: int,
        reduce: Callable[[Any, float, float], tuple[float, float, float]],
        sync: Callable[[], None],
        temp_slope: Callable[[], float],
        zeus_window: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cell, self.rank = cell, rank
        self.reduce, self.sync, self.temp_slope = reduce, sync, temp_slope
        self.zeus_window, self.clock = zeus_window, clock
        self.warmup = WarmupMonitor(cell.warmup)
        self.in_warmup = cell.warmup.max_steps > 0
        self.records: list[StepRecord] = []
        self.measured = 0
        self.step = 0
        self.prev_end: float | None = None
        self.zeus_totals: dict[str, float] = {}
        self.done = False

    def __deepcopy__(self, memo: dict[int, Any]) -> StepBoundaries:
        # nl.Trainer deep-copies its arguments into its config record (nemo.lightning.io); this
        # callback holds the job's live sampler, Zeus window and engine: it is the same callback
        return self

    # -- Lightning hooks ---------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.sync()
        if not self.in_warmup and self.zeus_window is not None:
            self.zeus_window.begin()
        self.prev_end = self.clock()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.prev_end is None:  # no on_train_start (a trainer that skips it): start here
            self.prev_end = self.clock()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.done:
            return
        assert self.prev_end is not None
        t_start = self.prev_end
        self.sync()
        local_s = self.clock() - t_start
        loss, step_max_s, slope_max = self.reduce(_loss_of(outputs), local_s, self.temp_slope())
        t_end = self.clock()
        phase = "warmup" if self.in_warmup else "measure"
        tokens = self.cell.tokens_per_step
        rec = StepRecord(self.step, phase, t_start, t_end, loss, tokens)
        self.records.append(rec)
        if self.rank == 0:
            _log(
                f"step {self.step:5d} [{phase}] loss {loss:.4f} time {rec.duration_s:.4f} s "
                f"tok/s {tokens / rec.duration_s:,.0f}"
                + (f" dT/dt {slope_max:+.3f} C/s" if math.isfinite(slope_max) else "")
            )
        self.prev_end = t_end
        self.step += 1
        if self.in_warmup:
            if self.warmup.update(step_max_s, slope_max):
                self.in_warmup = False
                if self.zeus_window is not None:
                    self.zeus_window.begin()
                if self.rank == 0:
                    _log(f"warm-up over after {self.step} steps ({self.warmup.reason}); measuring {self.cell.steps}")
        else:
            self.measured += 1
            if self.measured >= self.cell.steps:
                if self.zeus_window is not None:
                    self.zeus_totals = self.zeus_window.end()
                self.done = True
                if trainer is not None:
                    trainer.should_stop = True


def _loss_of(outputs: Any) -> Any:
    """The step's loss tensor from what Lightning passes to ``on_train_batch_end``."""
    import torch

    if isinstance(outputs, dict):
        outputs = outputs.get("loss", outputs.get("reduced_train_loss"))
    if isinstance(outputs, torch.Tensor):
        return outputs.detach().float().mean()
    if isinstance(outputs, (int, float)):
        return torch.tensor(float(outputs))
    return torch.tensor(float("nan"))


def lightning_callback(boundaries: StepBoundaries) -> Any:
    """``boundaries`` as a ``lightning.pytorch.Callback`` (the same object, its class mixed in)."""
    import lightning.pytorch as pl

    boundaries.__class__ = type("StepBoundariesCallback", (StepBoundaries, pl.Callback), {})
    return boundaries


def _mock_data_module(llm: Any) -> Any:
    """NeMo's ``MockDataModule`` with its datasets built as NeMo 2.7.3 meant to.

    2.7.3's ``MockDataModule.setup`` passes ``create_attention_mask`` positionally into
    ``_MockGPTDataset``'s ``seed`` slot, so no batch ever carries the attention mask, and
    without Transformer Engine NeMo's GPT forward step refuses a batch without one (seen on
    CPU: "The dataloader did not provide an attention mask"). Same datasets, keyword passed.
    """
    from nemo.collections.llm.gpt.data.mock import _MockGPTDataset

    class MockDataModule(llm.MockDataModule):  # type: ignore[misc,name-defined]
        def setup(self, stage: str = "") -> None:
            def ds(name: str, n: int) -> Any:
                return _MockGPTDataset(
                    self.tokenizer, name, n, self.seq_length, create_attention_mask=self.create_attention_mask
                )

            self._train_ds = ds("train", self.num_train_samples)
            self._validation_ds = ds("valid", self.num_val_samples)
            self._test_ds = ds("test", self.num_test_samples)

    return MockDataModule


def _import_nemo() -> Any:
    try:
        from nemo.collections import llm
    except ImportError as err:
        raise EngineUnavailableError(
            "engine 'nemo' needs NeMo 2.7.3 (nemo-toolkit, requirements-nemo.lock) in the training environment: "
            f"{err}; the install stage builds it for campaigns with engine: nemo, or set the cluster's "
            "nemo_container"
        ) from err
    return llm


def _dtype(name: str | None) -> Any:
    import torch

    return None if name is None else getattr(torch, name)


class VocabTokenizer:
    """What NeMo's model and mock data read of a tokenizer for synthetic tokens: the vocabulary size."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.eos_id = self.eod = vocab_size - 1
        self.bos_id = 0
        self.pad_id = -1

    def _no_text(self, *a: Any) -> Any:
        raise EngineUnavailableError("engine 'nemo' runs synthetic token ids: there is no text tokenizer")

    text_to_tokens = tokens_to_text = tokens_to_ids = ids_to_tokens = text_to_ids = ids_to_text = _no_text


class NemoEngine:
    """NeMo's trainer for one rank; :meth:`train` runs the whole loop (``drives_loop``)."""

    drives_loop = True
    profiles = False  # the kernel breakdown (opt.profile) is the torch/megatron engines'

    def __init__(self, cell: CellSpec, denv: DistEnv, device: Any) -> None:
        from charllm.nemo_config import nemo_config

        if device.type != "cuda":
            raise EngineUnavailableError("engine 'nemo' runs on GPUs only (NeMo's MegatronStrategy needs CUDA)")
        self.cell, self.denv, self.device = cell, denv, device
        try:
            self.config = nemo_config(cell)
        except ValueError as err:
            raise EngineUnavailableError(str(err)) from err
        self.accum = cell.grad_accum
        p = cell.parallel
        self.grad_sync = (
            "megatron-ddp reduce-scatter (distributed optimizer, NeMo MegatronStrategy)"
            + (", overlapped with backward" if cell.opt.overlap else ", after backward")
            if p.dp > 1
            else "megatron-ddp (dp 1: no reduction)"
        )
        self.llm = _import_nemo()
        from charllm.train.megatron_spec import transformer_engine_importable

        self.te = transformer_engine_importable()
        self.spec_name = "nemo default (Transformer Engine)" if self.te else "local"
        self.boundaries: StepBoundaries | None = None

    # -- building NeMo's objects -------------------------------------------------------
    def _layer_spec(self) -> Any:
        if self.te:
            return None  # GPTConfig's default_layer_spec: TE's
        from charllm.train.megatron_spec import block_spec, select_layer_spec

        shape = self.cell.model
        norm = "RMSNorm" if shape.family in ("llama3", "mixtral") else "LayerNorm"
        layer_spec, name = select_layer_spec(shape.num_experts or None, norm, True, False)

        def spec(config: Any, vp_stage: int | None = None) -> Any:
            return block_spec(layer_spec, name, config, vp_stage)

        return spec

    def build(self, callbacks: list[Any]) -> tuple[Any, Any, Any]:
        import torch.nn.functional as F
        from megatron.core.distributed import DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig
        from nemo import lightning as nl

        llm, c = self.llm, self.config
        s = dict(c["strategy"])
        s["pipeline_dtype"] = _dtype(s["pipeline_dtype"])
        strategy = nl.MegatronStrategy(ddp=DistributedDataParallelConfig(**c["ddp"]), **s)
        pr = dict(c["precision"])
        precision = nl.MegatronMixedPrecision(
            precision=pr["precision"],
            params_dtype=_dtype(pr["params_dtype"]),
            pipeline_dtype=_dtype(pr["pipeline_dtype"]),
            autocast_enabled=pr["autocast_enabled"],
            grad_reduce_in_fp32=pr["grad_reduce_in_fp32"],
        )
        o = dict(c["optimizer"])
        o["params_dtype"] = _dtype(o["params_dtype"])
        o.pop("min_lr", None)
        optim = nl.MegatronOptimizerModule(config=OptimizerConfig(**o))
        m = dict(c["model"])
        m["params_dtype"] = _dtype(m["params_dtype"])
        m["activation_func"] = {"gelu": F.gelu, "silu": F.silu}[m["activation_func"]]
        vocab = m.pop("vocab_size")
        m = {k: v for k, v in m.items() if v is not None}
        spec = self._layer_spec()
        if spec is not None:
            m["transformer_layer_spec"] = spec
        tokenizer = VocabTokenizer(vocab)
        model = llm.GPTModel(llm.GPTConfig(**m), optim=optim, tokenizer=tokenizer)
        data = _mock_data_module(llm)(tokenizer=tokenizer, **c["data"])
        # without TE, NeMo's GPT data step insists on an s x s attention mask in every batch;
        # charllm's SDPA core attention is causal by itself and ignores it (the megatron engine
        # passes none): the mask costs its host-to-device copy only
        data.create_attention_mask = bool(c["data"]["create_attention_mask"]) or not self.te
        t = dict(c["trainer"])
        import torch

        per_node = max(1, min(self.denv.world_size, torch.cuda.device_count()))
        t["devices"], t["num_nodes"] = per_node, max(1, self.denv.world_size // per_node)
        t.pop("val_check_interval", None)
        trainer = nl.Trainer(strategy=strategy, plugins=precision, callbacks=callbacks, **t)
        return trainer, model, data

    # -- the run ------------------------------------------------------------------------
    def train(self, job: Any, sampler: Any, is_gpu: bool, zeus_window: Any = None) -> list[StepRecord]:
        import torch

        boundaries = StepBoundaries(
            self.cell,
            job.rank,
            reduce=self.reduce_step_stats,
            sync=self.sync,
            temp_slope=lambda: job._temp_slope(sampler, is_gpu),
            zeus_window=zeus_window,
        )
        self.boundaries = boundaries
        job.warmup = boundaries.warmup
        trainer, model, data = self.build([self.callback(boundaries)])
        self._model = model
        torch.manual_seed(self.cell.seed)
        import torch.distributed as dist

        if dist.is_initialized():
            # NeMo 2.7.3's MegatronStrategy.setup_distributed returns early when the process group
            # exists, before it initialises megatron's model-parallel groups and its data sampler:
            # hand the group over to it (it makes the same one from the launcher's environment);
            # the job's collectives after fit() run on NeMo's group
            dist.barrier()
            dist.destroy_process_group()
        trainer.fit(model, data)
        job.zeus_totals = boundaries.zeus_totals
        if not boundaries.done:
            raise EngineUnavailableError(
                f"NeMo's trainer stopped after {boundaries.step} steps, before the {self.cell.steps} measured steps"
            )
        return boundaries.records

    def callback(self, boundaries: StepBoundaries) -> Any:
        return lightning_callback(boundaries)

    def step(self, step: int) -> Any:  # pragma: no cover - the trainer drives the steps
        raise EngineUnavailableError("engine 'nemo' runs its steps inside NeMo's trainer (train())")

    def sync(self) -> None:
        import torch

        torch.cuda.synchronize(self.device)

    def _reports_loss(self) -> bool:
        from megatron.core import parallel_state as ps

        return bool(ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0)

    def reduce_step_stats(self, loss: Any, step_time_s: float, temp_slope: float) -> tuple[float, float, float]:
        from charllm.train.dist import reduce_step_stats

        return reduce_step_stats(loss.to(self.device), step_time_s, temp_slope, self._reports_loss(), self.device)

    def describe(self) -> dict[str, Any]:
        import nemo

        c = self.config
        return {
            "engine": "nemo",
            "nemo": str(getattr(nemo, "__version__", "?")),
            "megatron_core": _mcore_version(),
            "model": f"nemo.collections.llm.GPTModel, {self.spec_name} layer spec",
            "layer_spec": self.spec_name,
            "transformer_engine": self.te,
            "strategy": c["strategy"],
            "ddp": c["ddp"],
            "precision": c["precision"],
            "optimizer": {k: v for k, v in c["optimizer"].items()},
            "grad_sync": self.grad_sync,
            "grad_accum": self.accum,
            "recompute": c["model"]["recompute_granularity"] or "none",
            "tp_comm_overlap": c["model"]["tp_comm_overlap"] and self.te,
            "profile": "not wired for engine nemo (no kernel breakdown)" if self.cell.opt.profile else None,
            "step_clock": "charllm StepBoundaries Lightning callback, time.time() after cuda synchronize",
        }


def _mcore_version() -> str:
    import megatron.core

    return str(getattr(megatron.core, "__version__", "?"))


def build(cell: CellSpec, denv: DistEnv, device: Any) -> NemoEngine:
    return NemoEngine(cell, denv, device)
