"""Run megatron-core's GPU-only code paths on the CPU (gloo): a device shim, active on CPU only.

megatron-core 0.16.1 assumes CUDA in places that do no CUDA *computation*: it places small
bookkeeping tensors and its gradient buffers with ``device="cuda"`` or
``torch.cuda.current_device()`` (pipeline schedules' token counter, P2P shape exchange, DDP's
``ParamAndGradBuffer``, the optimizers' ``found_inf``/scale tensors, grad-norm clipping, MoE
router and aux-loss bookkeeping, RoPE frequencies), checks parameter types by their CUDA
names (``param.type() == "torch.cuda.FloatTensor"`` in the distributed and mixed-precision
optimizers), creates CUDA streams (MoE all-to-all dispatcher, overlapped grad reduce) and
saves/restores the CUDA RNG state (its RNG tracker, activation recompute).

:func:`cpu_shim` maps exactly these to the CPU, while it is entered, and nothing else:

- a :class:`~torch.overrides.TorchFunctionMode` rewrites a CUDA ``device`` argument of a torch
  call (``"cuda"``, ``"cuda:N"``, ``torch.device("cuda", N)`` or the ordinal ``N``) to the
  CPU, makes ``Tensor.cuda()`` a no-op, and reports a CPU tensor's ``Tensor.type()`` under its
  CUDA name (``torch.FloatTensor`` -> ``torch.cuda.FloatTensor``): the same dtype, so the
  optimizer takes the branch it takes on GPU;
- ``torch.cuda.current_device()`` returns the CPU device (also where the mode is not active:
  inside ``backward``, which the mode's handler runs with the mode popped);
  ``torch.cuda.synchronize`` does nothing (there is no CUDA work to wait for);
  ``torch.cuda.Stream``/``stream``/``current_stream``/``default_stream`` are a stream that
  runs everything in order on the CPU (what a CUDA stream would do, serialised), and
  ``torch.cuda.Event`` an event that has always completed;
- the MoE dispatcher's ``maybe_move_tensor_to_cpu`` copies its split sizes to host (numpy)
  only from CUDA tensors, and leaves CPU tensors as tensors, which ``all_to_all_single``
  rejects as split sizes: the shim makes the host copy for CPU tensors too;
- gloo lacks two collectives NCCL has, which megatron-core's MoE all-to-all dispatcher uses
  with tp > 1 and ep > 1 (token lists of different lengths per tensor-parallel rank): an
  all-gather into uneven pieces (here: pad to the longest, ``all_gather_into_tensor``, drop the
  padding) and its backward, a reduce-scatter of uneven pieces (here: ``all_reduce`` of the
  whole tensor, each rank keeping its own rows). Same rows, same sums; more bytes moved;
- the CUDA RNG functions megatron-core calls (``torch.cuda.get_rng_state``/``set_rng_state``/
  ``manual_seed`` and its tracker's ``_get_cuda_rng_state``/``_set_cuda_rng_state``) act on
  the CPU generator, which is the generator CPU kernels (dropout, init) draw from: the RNG
  tracker forks it for tensor-parallel regions and activation recompute replays with the
  state it saved, as on GPU.

Every tensor operation still runs, on the CPU, with the same arguments; nothing is skipped
or faked. The shim is entered by the megatron engine around its own calls only when its
device is the CPU (:meth:`charllm.train.engine_megatron.MegatronEngine`), and undone on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

CPU = torch.device("cpu")


def _is_cuda(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)


class _CudaToCpu(TorchFunctionMode):
    """Maps CUDA device arguments of torch calls to the CPU (see the module docstring)."""

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            if args[0].device.type == "cpu" and name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch.") :]
            return name
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], CPU, *args[2:])
        return func(*args, **kwargs)


class _SerialEvent:
    """A stand-in for ``torch.cuda.Event`` on the CPU: everything before it has already run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _SerialStream:
    """A stand-in for ``torch.cuda.Stream`` on the CPU: work runs in program order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event if event is not None else _SerialEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _cpu_get_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(state)


def _cpu_manual_seed(seed: int) -> None:
    torch.manual_seed(seed)


def _host_copy(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """``moe_utils.maybe_move_tensor_to_cpu`` for CPU tensors: the host copy the GPU path makes."""
    if torch.is_tensor(tensor):
        tensor = tensor.detach().clone()
        return tensor.numpy() if as_numpy else tensor
    return tensor


def _uneven_gather_first_dim(original: Callable[..., Any]) -> Callable[..., Any]:
    """``mappings._gather_along_first_dim`` with uneven ``output_split_sizes`` on gloo.

    Megatron gathers per-rank token lists of different lengths over the tensor-parallel group
    (MoE all-to-all dispatcher with tp > 1 and ep > 1) by ``all_gather`` into a list of uneven
    tensors, which NCCL accepts and gloo refuses. Here each rank's rows are padded to the
    longest, all-gathered, and the padding dropped: the same rows arrive in the same order.
    """

    def gather(
        input_: torch.Tensor, group: Any, output_split_sizes: Any = None, use_global_buffer: bool = False
    ) -> Any:
        sizes = None if output_split_sizes is None else [int(n) for n in output_split_sizes]
        if sizes is None or len(set(sizes)) <= 1 or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        import torch.distributed as dist

        longest = max(sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        out = input_.new_empty((longest * len(sizes), *input_.shape[1:]))
        dist.all_gather_into_tensor(out, padded.contiguous(), group=group)
        return torch.cat([out[r * longest : r * longest + n] for r, n in enumerate(sizes)], dim=0)

    return gather


def _uneven_reduce_scatter_first_dim(original: Callable[..., Any]) -> Callable[..., Any]:
    """``mappings._reduce_scatter_along_first_dim`` with uneven ``input_split_sizes`` on gloo.

    The backward of the uneven gather above: gloo has no reduce-scatter of uneven lists, so the
    whole input is summed over the group (``all_reduce``) and each rank keeps its own rows,
    the rows NCCL's reduce-scatter would have given it.
    """

    def reduce_scatter(
        input_: torch.Tensor, group: Any, input_split_sizes: Any = None, use_global_buffer: bool = False
    ) -> Any:
        sizes = None if input_split_sizes is None else [int(n) for n in input_split_sizes]
        if sizes is None or len(set(sizes)) <= 1 or group.size() == 1:
            return original(input_, group, input_split_sizes, use_global_buffer)
        import torch.distributed as dist

        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        start = sum(sizes[: group.rank()])
        return total[start : start + sizes[group.rank()]].contiguous()

    return reduce_scatter


@contextlib.contextmanager
def cpu_shim() -> Iterator[None]:
    """Map megatron-core's CUDA placements, streams and RNG calls to the CPU while entered."""
    import megatron.core.tensor_parallel.mappings as mmappings
    import megatron.core.tensor_parallel.random as mrandom
    import megatron.core.transformer.moe.token_dispatcher as mdispatch

    serial = _SerialStream()
    patches: list[tuple[Any, str, Any]] = [
        (torch.cuda, "current_device", lambda: CPU),
        (torch.cuda, "synchronize", lambda *a, **k: None),
        (torch.cuda, "Stream", _SerialStream),
        (torch.cuda, "Event", _SerialEvent),
        (torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext()),
        (torch.cuda, "current_stream", lambda *a, **k: serial),
        (torch.cuda, "default_stream", lambda *a, **k: serial),
        (torch.cuda, "get_rng_state", _cpu_get_rng_state),
        (torch.cuda, "set_rng_state", _cpu_set_rng_state),
        (torch.cuda, "manual_seed", _cpu_manual_seed),
        (mrandom, "_get_cuda_rng_state", _cpu_get_rng_state),
        (mrandom, "_set_cuda_rng_state", _cpu_set_rng_state),
        (mdispatch, "maybe_move_tensor_to_cpu", _host_copy),
        (mmappings, "_gather_along_first_dim", _uneven_gather_first_dim(mmappings._gather_along_first_dim)),
        (
            mmappings,
            "_reduce_scatter_along_first_dim",
            _uneven_reduce_scatter_first_dim(mmappings._reduce_scatter_along_first_dim),
        ),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, new in patches:
        setattr(obj, name, new)
    try:
        with _CudaToCpu():
            yield
    finally:
        for obj, name, old in saved:
            setattr(obj, name, old)
