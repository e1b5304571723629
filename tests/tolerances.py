"""Named fp32 tolerances for tests that compare two *different* computations of the same quantity.

fp32 rounds every operation to 2^-24 (6e-8) relative, and the kernels a CPU gets (ATen's AVX2 / AVX-512 / scalar
paths, MKL's and oneDNN's per-ISA GEMMs and convolutions, AMX tiles) order their sums and fuse multiply-adds
differently. Two code paths equal in exact arithmetic therefore agree only up to round-off, and by how much
differs from CPU to CPU. A test that compares different paths (merged vs unmerged LoRA, split vs joint backward,
fold-on-the-fly vs explicit, ours vs a reference formula or torchvision/peft/timm, DDP vs one process, batched vs
per-sample) uses one of the tolerances below, which every IEEE-conforming kernel meets with a wide margin. The same
code run twice on the same inputs (resume vs uninterrupted, save/load round trips, determinism, cache hits) is
compared bit for bit with ``torch.equal`` instead.

Each tolerance is a mapping for ``torch.testing.assert_close(a, b, **TOL)``, ``torch.allclose(a, b, **TOL)`` or
``np.testing.assert_allclose(a, b, **TOL)``; :func:`approx` makes a ``pytest.approx`` of it. ``atol`` assumes
values of order 1 (normalised activations, probabilities, losses, pixels in [0, 1]); :func:`scaled` multiplies it
by the size of other values. The margins stay far below what a real bug moves: a missing LoRA scaling, a wrong
sign or a dropped term changes these results by percent, not by 1e-4.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

FP32_ONE_OP = {"rtol": 1e-5, "atol": 1e-6}
"""One fp32 op or a short reduction (up to ~100 terms, e.g. a small matmul, a softmax, a resampling tap sum):
a few ulps in any summation order; 1e-5 is ~100 ulps."""

FP32_NETWORK = {"rtol": 1e-4, "atol": 1e-5}
"""A forward (or backward) through several layers (matmuls of width 64-384, LayerNorm, softmax, GELU): round-off
of each op grows with depth and LayerNorm/softmax amplify it. Measured under AVX-512, ATen AVX2 and scalar kernels,
oneDNN AVX2 and MKL AVX2: at most 2e-6 absolute on outputs of size ~3 (test_lora.py, test_export.py,
test_dinov2_objective.py), i.e. a margin of 10x or more."""

FP32_TRAINING = {"rtol": 1e-4, "atol": 1e-6}
"""Logged scalars (loss terms, learning rate, gradient norm) of a few training steps computed two ways (DDP vs one
process, FSDP2 vs DDP, compiled vs eager blocks): the network round-off above carried through optimiser steps;
measured below 1e-6 relative for DDP and FSDP2 (docs/distributed.md)."""


def scaled(tol: dict[str, float], like: torch.Tensor) -> dict[str, float]:
    """``tol`` with ``atol`` multiplied by the largest magnitude in ``like``, for values far from order 1."""
    return {"rtol": tol["rtol"], "atol": tol["atol"] * float(like.detach().abs().max())}


def approx(expected: Any, tol: dict[str, float]) -> Any:
    """``pytest.approx(expected)`` with the relative/absolute tolerance of ``tol``."""
    return pytest.approx(expected, rel=tol["rtol"], abs=tol["atol"])
