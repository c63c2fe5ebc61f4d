"""Columns of a telemetry sample row (one row per GPU per tick), units in the names.

Identity columns are strings/ints and are set on every row. Measured columns are float64
with NaN for a value that could not be read (an NVML error, or a field the device does not
expose): one dtype for all of them keeps Parquet files of different GPUs concatenable.
Counters (``*_total_*``) are cumulative since driver load; rates come from their differences.
"""

from __future__ import annotations

IDENTITY_COLUMNS: tuple[str, ...] = ("host", "rank", "local_rank", "gpu_index", "gpu_uuid", "pci_bus_id")

GPU_COLUMNS: tuple[str, ...] = (
    "power_w",  # instant board power (NVML_FI_DEV_POWER_INSTANT, else nvmlDeviceGetPowerUsage)
    "mem_power_w",  # memory power (NVML_FI_DEV_POWER_AVERAGE, scope MEMORY), where exposed
    "energy_total_j",  # nvmlDeviceGetTotalEnergyConsumption, mJ -> J
    "gpu_temp_c",
    "mem_temp_c",
    "sm_clock_mhz",
    "mem_clock_mhz",
    "gpu_util_pct",
    "mem_util_pct",
    "clock_event_reasons",  # bitmask (nvmlClocksEventReason*), exact in float64
    "power_limit_w",  # enforced power limit
    "pcie_tx_total_bytes",  # NVML_FI_DEV_PCIE_COUNT_TX_BYTES
    "pcie_rx_total_bytes",
    "nvlink_tx_total_kib",  # NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, all links
    "nvlink_rx_total_kib",
)

NODE_COLUMNS: tuple[str, ...] = ("cpu_util_pct", "mem_used_bytes", "mem_total_bytes")

META_COLUMNS: tuple[str, ...] = ("unix_s", "read_latency_s", "nvml_errors_total")

ALL_COLUMNS: tuple[str, ...] = IDENTITY_COLUMNS + META_COLUMNS + GPU_COLUMNS + NODE_COLUMNS

# nvmlClocksEventReason* bits; names are the metric suffixes in result.json.
CLOCK_EVENT_REASONS: dict[str, int] = {
    "gpu_idle": 0x1,
    "applications_clocks": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal": 0x20,
    "hw_thermal": 0x40,
    "hw_power_brake": 0x80,
    "display_clock": 0x100,
}
