"""The peak dense bf16 TFLOP/s of a GPU, for MFU without configuration (train.peak_tflops unset).

Vendor datasheet figures, dense (no structured sparsity), bf16 with fp32 accumulation, as the anchors' MFU uses
them. Matched against torch.cuda.get_device_name, most specific first."""

from __future__ import annotations

PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The table's figure for a CUDA device name (e.g. "NVIDIA H100 80GB HBM3"), None for a device it lacks."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def resolve_peak_tflops(configured: float | None, device_name: str | None) -> tuple[float, str | None]:
    """(the peak for MFU, 0 for none; a note for the console or None). configured: train.peak_tflops (None: detect
    from device_name, the GPU's name, None on CPU)."""
    if configured is not None:
        return configured, None
    if device_name is None:
        return 0.0, None  # CPU: MFU means little
    detected = peak_tflops(device_name)
    if detected is None:
        return 0.0, (
            f"no peak TFLOP/s known for {device_name}: MFU is not logged; set train.peak_tflops to the "
            "device's dense bf16 TFLOP/s"
        )
    return detected, None
