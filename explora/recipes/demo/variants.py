"""The demo's pre-training variants: which ExPLoRA preset each runs, and how the report labels it."""

from __future__ import annotations

from typing import Any, NamedTuple


class Variant(NamedTuple):
    """One pre-training run of the demo: an ExPLoRA preset, its label in the report, and overrides of the preset."""

    preset: str
    label: str
    overrides: dict[str, Any] = {}


VARIANTS: dict[str, Variant] = {
    "explora": Variant("D-[L]-r64", "ExPLoRA D-[L]-r64"),
    "lora_only": Variant("lora-only-r64", "LoRA-only r64"),
    "unfreeze_only": Variant("unfreeze-only-[L]", "Unfreeze-only [L]"),
    # the official scripts' LoRA scaling 1/r (loralib alpha 1) instead of explora's alpha = r: an A/B of the scaling
    "explora_alpha1": Variant("D-[L]-r64", "ExPLoRA D-[L]-r64, scaling 1/r", {"lora_alpha": 1.0}),
}
