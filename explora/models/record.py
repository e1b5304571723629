"""What explora knows about a backbone besides its state dict, kept in one typed place.

timm's ``VisionTransformer`` has no slot for the upstream tensors a checkpoint may carry next to the encoder (DinoV2's
iBOT mask token, MAE's decoder), for where the weights came from, or for the ExPLoRA parameterisation applied to it.
They travel with the module in a single attribute, :data:`ATTRIBUTE`, holding an :class:`ExploraRecord`:
:func:`~explora.models.backbone.build_backbone` and :func:`~explora.models.export.load_encoder` create it,
:func:`~explora.models.adapt.apply_explora` fills ``spec``. It is a plain attribute (not a buffer), so it is never
part of a state dict and checkpoint/export keys are unchanged; ``copy.deepcopy`` (the DinoV2 teacher) copies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from explora.models.adapt import ExploraSpec

ATTRIBUTE = "explora_record"


@dataclass
class ExploraRecord:
    """``source``: where the weights came from (e.g. ``"dinov2-hub checkpoint ....pth (+mask_token)"``);
    ``mask_token``: DinoV2's (1, D) iBOT mask token or None; ``mae_decoder``: the MAE decoder state dict (upstream key
    names) or None; ``mae_decoder_targets``: what that decoder reconstructs (``"pixel"``, ``"norm_pix"``, None when
    unknown); ``spec``: the ExPLoRA spec :func:`~explora.models.adapt.apply_explora` applied, or None."""

    source: str | None = None
    mask_token: Tensor | None = None
    mae_decoder: dict[str, Tensor] | None = None
    mae_decoder_targets: str | None = None
    spec: ExploraSpec | None = None


def record_of(module: nn.Module) -> ExploraRecord:
    """The module's record; an empty one (not attached) for a module explora did not build, e.g. a bare timm model."""
    record = module.__dict__.get(ATTRIBUTE)
    return record if record is not None else ExploraRecord()


def attach_record(module: nn.Module, record: ExploraRecord) -> ExploraRecord:
    """Set ``module``'s record (replacing any) and return it."""
    setattr(module, ATTRIBUTE, record)
    return record


def ensure_record(module: nn.Module) -> ExploraRecord:
    """The module's record, attaching an empty one first when it has none (for writers such as apply_explora)."""
    record = module.__dict__.get(ATTRIBUTE)
    return record if record is not None else attach_record(module, ExploraRecord())


__all__ = ["ATTRIBUTE", "ExploraRecord", "attach_record", "ensure_record", "record_of"]
