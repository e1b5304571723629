"""What machine a benchmark's numbers come from: CPU model and its bf16-relevant flags, threads, torch build, GPU.

Every benchmark JSON carries this record under ``"machine"``, so a figure can always be traced to its hardware
(a bf16 speed-up means something else on a CPU with AMX than on an AVX2-only one, where bf16 is emulated).
"""

from __future__ import annotations

import os
import platform
import re
import time

import torch

# CPU flags that decide how fast fp32 / bf16 matmuls run (Linux /proc/cpuinfo names)
BF16_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16",
              "amx_int8")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return model, flags


def _build() -> dict:
    """The torch build: version, CPU kernels it dispatches to, BLAS / oneDNN versions, CUDA."""
    config = torch.__config__.show()
    onednn = re.search(r"MKL-DNN v([\d.]+)", config)
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    return {"version": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "blas": blas.group(1) if blas else None, "onednn": onednn.group(1) if onednn else None,
            "mkldnn_available": torch.backends.mkldnn.is_available(), "cuda": torch.version.cuda,
            # a cap on oneDNN's instruction set (e.g. AVX512_CORE_BF16: native bf16 without AMX) changes the peak
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")}


def machine() -> dict:
    """The record: CPU model, cores, bf16-relevant flags present, native bf16, torch threads, torch build, GPU, date."""
    from explora.core.precision import cpu_has_fast_bf16

    model, flags = _cpuinfo()
    out = {"cpu": model, "cpu_count": os.cpu_count(), "cpu_flags": [f for f in BF16_FLAGS if f in flags],
           "native_bf16_cpu": cpu_has_fast_bf16(), "threads": torch.get_num_threads(),
           "interop_threads": torch.get_num_interop_threads(), "torch": torch.__version__, "torch_build": _build(),
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_count"] = torch.cuda.device_count()
    return out
