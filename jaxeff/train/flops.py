"""Model FLOPs utilisation: achieved model FLOPs over the devices' peak dense bf16 rate."""

from __future__ import annotations

import jax

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' datasheets, in FLOP/s.
PEAK_BF16_FLOPS = {
    "H100": 989e12,  # SXM; PCIe parts are lower (756e12) and are named "H100 PCIe"
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None when unknown (CPUs)."""
    device = device or jax.devices()[0]
    kind = device.device_kind
    best = None
    for name, peak in PEAK_BF16_FLOPS.items():
        if name in kind and (best is None or len(name) > len(best[0])):
            best = (name, peak)
    return None if best is None else best[1]


def mfu(flops_per_token: float, tokens_per_second: float, n_devices: int, peak: float | None) -> float | None:
    if peak is None:
        return None
    return flops_per_token * tokens_per_second / (peak * n_devices)
