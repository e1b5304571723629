"""The ExploraRecord travels with a backbone without touching its state dict."""

from __future__ import annotations

import copy

import timm
import torch

from explora.models.adapt import apply_preset
from explora.models.backbone import build_backbone
from explora.models.record import ATTRIBUTE, ExploraRecord, ensure_record, record_of


def test_build_backbone_attaches_a_record_outside_the_state_dict() -> None:
    vit = build_backbone("test_mae")
    keys = set(vit.state_dict())
    record = record_of(vit)
    assert record.source == "random init" and record is record_of(vit)
    spec = apply_preset(vit, "LoRA-r8")
    assert record_of(vit).spec is spec and record_of(vit) is record
    assert not any(ATTRIBUTE in k for k in vit.state_dict()) and keys <= set(vit.state_dict())
    twin = copy.deepcopy(vit)  # the DinoV2 teacher is a deep copy: its record comes along, as a copy
    assert record_of(twin).spec == spec and record_of(twin) is not record


def test_a_bare_timm_model_reads_an_empty_record_until_one_is_attached() -> None:
    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, depth=1)
    assert record_of(vit) == ExploraRecord() and ATTRIBUTE not in vit.__dict__
    ensure_record(vit).source = "hand-made"
    assert record_of(vit).source == "hand-made"
