"""One GPU read through NVML (``nvidia-ml-py``), one call of :meth:`NvmlSource.read` per tick.

Why NVML directly and not Zeus 0.16's monitors: ``zeus.monitor.PowerMonitor`` and
``TemperatureMonitor`` poll in separate processes (spawn start method, one per power domain,
each re-importing the training script's main module) and keep de-duplicated timelines of
different cadences; clocks, clock-event reasons, utilisation, PCIe/NVLink counters and the
power limit are not covered at all, so a row per tick would still need our own NVML reads,
joined by timestamp across processes. ``zeus.monitor.power`` also imports scikit-learn, which
GPU nodes need not carry. One thread per GPU reading every field in one pass (most of them in
a single ``nvmlDeviceGetFieldValues`` call) is cheaper and keeps all fields of a row at one
instant. ``benchmarks/gpu_validate.py`` cross-checks our energy against ``ZeusMonitor``.

Every field is read on its own: an NVML error is a NaN in that column and one more in
:attr:`NvmlSource.errors`, never an exception out of :meth:`read`. Fields the device does not
support at start (probed once) are left out and reported in :attr:`unsupported`, not counted
as errors on every tick.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import Any

from charllm.telemetry.errors import MonitorError

NAN = math.nan
_ALL_LINKS = 0xFFFFFFFF  # scopeId meaning "sum over all NVLink links"

# column, field id name in pynvml, scope id name (or an int), scale to the column's unit
_FIELDS: tuple[tuple[str, str, str | int, float], ...] = (
    ("power_w", "NVML_FI_DEV_POWER_INSTANT", "NVML_POWER_SCOPE_GPU", 1e-3),
    ("mem_power_w", "NVML_FI_DEV_POWER_AVERAGE", "NVML_POWER_SCOPE_MEMORY", 1e-3),
    ("energy_total_j", "NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 0, 1e-3),
    ("mem_temp_c", "NVML_FI_DEV_MEMORY_TEMP", 0, 1.0),
    ("pcie_tx_total_bytes", "NVML_FI_DEV_PCIE_COUNT_TX_BYTES", 0, 1.0),
    ("pcie_rx_total_bytes", "NVML_FI_DEV_PCIE_COUNT_RX_BYTES", 0, 1.0),
    ("nvlink_tx_total_kib", "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX", _ALL_LINKS, 1.0),
    ("nvlink_rx_total_kib", "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX", _ALL_LINKS, 1.0),
)

_VALUE_ATTR = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


def _decode(value: Any) -> float:
    return float(getattr(value.value, _VALUE_ATTR.get(int(value.valueType), "ullVal")))


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def load_nvml() -> Any:
    """Import and initialise pynvml; :class:`MonitorError` says how to fix it if that fails."""
    try:
        import pynvml
    except ImportError as err:
        raise MonitorError("GPU telemetry needs nvidia-ml-py: pip install nvidia-ml-py") from err
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        raise MonitorError(f"NVML did not initialise ({err}); is the NVIDIA driver loaded?") from err
    return pynvml


def cuda_uuid_of(torch_device_index: int) -> str | None:
    """NVML UUID (``GPU-...``) of a torch CUDA device; NVML ignores CUDA_VISIBLE_DEVICES."""
    import torch

    uuid = getattr(torch.cuda.get_device_properties(torch_device_index), "uuid", None)
    if uuid is None:
        return None
    text = str(uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


class NvmlSource:
    """Readings of one GPU. ``nvml`` is the pynvml module; tests inject a fake one."""

    def __init__(self, *, uuid: str | None = None, index: int | None = None, nvml: Any = None) -> None:
        self.nvml = nvml if nvml is not None else load_nvml()
        n = self.nvml
        try:
            if uuid is not None:
                self.handle = n.nvmlDeviceGetHandleByUUID(uuid)
            elif index is not None:
                self.handle = n.nvmlDeviceGetHandleByIndex(index)
            else:
                raise MonitorError("NvmlSource needs a GPU uuid or index")
        except n.NVMLError as err:
            raise MonitorError(f"NVML has no GPU {uuid or index}: {err}") from err
        self.errors = 0
        self.errors_by_field: collections.Counter[str] = collections.Counter()
        self.unsupported: list[str] = []
        self.identity = {
            "gpu_index": self._safe(lambda: int(n.nvmlDeviceGetIndex(self.handle)), -1),
            "gpu_uuid": self._safe(lambda: _text(n.nvmlDeviceGetUUID(self.handle)), ""),
            "pci_bus_id": self._safe(lambda: _text(n.nvmlDeviceGetPciInfo(self.handle).busId), ""),
        }
        self.info = {
            "name": self._safe(lambda: _text(n.nvmlDeviceGetName(self.handle)), ""),
            "serial": self._safe(lambda: _text(n.nvmlDeviceGetSerial(self.handle)), ""),
        }
        self._fields: list[tuple[str, tuple[int, int], float]] = []
        for col, fid_name, scope, scale in _FIELDS:
            fid = getattr(n, fid_name, None)
            scope_id = getattr(n, scope, None) if isinstance(scope, str) else scope
            if fid is None or scope_id is None:
                self.unsupported.append(col)
                continue
            self._fields.append((col, (int(fid), int(scope_id)), scale))
        self._calls = self._call_table()
        self._probe()

    def _safe(self, fn: Callable[[], Any], default: Any) -> Any:
        try:
            return fn()
        except self.nvml.NVMLError:
            return default

    def _call_table(self) -> list[tuple[tuple[str, ...], Callable[[], tuple[float, ...]]]]:
        n, h = self.nvml, self.handle
        reasons = (
            getattr(n, "nvmlDeviceGetCurrentClocksEventReasons", None) or n.nvmlDeviceGetCurrentClocksThrottleReasons
        )

        def util() -> tuple[float, float]:
            u = n.nvmlDeviceGetUtilizationRates(h)
            return float(u.gpu), float(u.memory)

        return [
            (("gpu_temp_c",), lambda: (float(n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)),)),
            (("sm_clock_mhz",), lambda: (float(n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)),)),
            (("mem_clock_mhz",), lambda: (float(n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM)),)),
            (("gpu_util_pct", "mem_util_pct"), util),
            (("clock_event_reasons",), lambda: (float(reasons(h)),)),
            (("power_limit_w",), lambda: (n.nvmlDeviceGetEnforcedPowerLimit(h) * 1e-3,)),
        ]

    def _probe(self) -> None:
        """Drop fields and calls that fail at start: unsupported, not errors."""
        n = self.nvml
        kept = []
        try:
            values = n.nvmlDeviceGetFieldValues(self.handle, [f[1] for f in self._fields])
            for f, v in zip(self._fields, values, strict=True):
                if int(v.nvmlReturn) == n.NVML_SUCCESS:
                    kept.append(f)
                else:
                    self.unsupported.append(f[0])
        except n.NVMLError:
            self.unsupported.extend(f[0] for f in self._fields)
        self._fields = kept
        if "power_w" in self.unsupported:
            # older GPUs/drivers: the (possibly averaged) board power reading
            self.unsupported.remove("power_w")
            self._calls.append((("power_w",), lambda: (n.nvmlDeviceGetPowerUsage(self.handle) * 1e-3,)))
            self.power_source = "nvmlDeviceGetPowerUsage"
        else:
            self.power_source = "NVML_FI_DEV_POWER_INSTANT"
        calls = []
        for cols, fn in self._calls:
            try:
                fn()
                calls.append((cols, fn))
            except n.NVMLError:
                self.unsupported.extend(cols)
        self._calls = calls

    def _error(self, col: str) -> None:
        self.errors += 1
        self.errors_by_field[col] += 1

    def read(self) -> dict[str, float]:
        """One reading of every supported field; NaN (and a counted error) where NVML failed."""
        n = self.nvml
        out: dict[str, float] = {}
        if self._fields:
            try:
                values = n.nvmlDeviceGetFieldValues(self.handle, [f[1] for f in self._fields])
                for (col, _, scale), v in zip(self._fields, values, strict=True):
                    if int(v.nvmlReturn) == n.NVML_SUCCESS:
                        out[col] = _decode(v) * scale
                    else:
                        out[col] = NAN
                        self._error(col)
            except n.NVMLError:
                for col, _, _ in self._fields:
                    out[col] = NAN
                    self._error(col)
        for cols, fn in self._calls:
            try:
                for col, val in zip(cols, fn(), strict=True):
                    out[col] = val
            except n.NVMLError:
                for col in cols:
                    out[col] = NAN
                    self._error(col)
        if out.get("power_w") == 0.0:
            # NVML answers 0 W when polled faster than its sensor updates; no GPU draws 0 W.
            out["power_w"] = NAN
            self._error("power_w")
        return out

    def close(self) -> None:
        """Nothing to release per device; nvmlShutdown is left to process exit (other users)."""


def driver_versions(nvml: Any = None) -> dict[str, str]:
    """Driver and CUDA-driver versions as NVML reports them ({} without NVML)."""
    try:
        n = nvml if nvml is not None else load_nvml()
    except MonitorError:
        return {}
    out = {}
    try:
        out["driver_version"] = _text(n.nvmlSystemGetDriverVersion())
        v = int(n.nvmlSystemGetCudaDriverVersion())
        out["cuda_driver_version"] = f"{v // 1000}.{(v % 1000) // 10}"
        out["nvml_version"] = _text(n.nvmlSystemGetNVMLVersion())
    except n.NVMLError:
        pass
    return out
