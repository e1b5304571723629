"""explora: ExPLoRA — parameter-efficient extended pre-training to adapt vision transformers to new domains.

Khanna, Irgau, Lobell, Ermon, ICML 2025 (arXiv 2406.10973). Start from natural-image self-supervised weights
(DinoV2 or MAE), continue the same objective on unlabeled images of the new domain while training only 1-2 unfrozen
blocks, all norm layers and LoRA on Q and V of the other blocks, then fine-tune with LoRA or linear-probe.

The public API, by stage::

    backbone = build_backbone("dinov2_vitl14", weights="default", img_size=224)   # any upstream checkpoint layout
    spec = apply_preset(backbone, "D-[L]-r64")                                   # or apply_explora(backbone, ...)
    print(parameter_report(backbone).to_markdown())                              # 18.7M trainable on ViT-L/14
    objective = DinoV2Objective(backbone, DinoV2Config(), total_steps=...)       # or MAEObjective
    train(objective, build_dataset("fmow:/data/train.csv", image_size=256), OptimConfig(), TrainConfig(), "runs/x")
    export_backbone(objective.export_backbone(), "runs/x/export", timm_name="vit_large_patch14_dinov2")
    run_segment(backbone, build_dataset("seg_folder:/data/water:classes=2", image_size=224), val, "runs/seg",
                image_size=224, mode="lora", head="upernet")                       # mIoU, report, best/
    write_model_card("runs/x/export", "runs/x")      # README.md; timm.create_model("local-dir:runs/x/export", ...)

Most users run the same through the CLI: ``explora pretrain --config dinov2_vitl14_fmow_D-L-r64``.
"""

from __future__ import annotations

from explora.core.errors import CheckpointError, ConfigError, DataError, DivergenceError, ExploraError
from explora.data import build_dataset, check_dataset, compute_stats
from explora.data.multicrop import MultiCrop
from explora.engine.step import StepOutput, forward_backward
from explora.engine.trainer import OptimConfig, TrainConfig, TrainResult, train
from explora.eval.features import extract_features
from explora.eval.knn import knn_classify
from explora.eval.linprobe import LinearProbeConfig, train_linear_probe
from explora.eval.seg_metrics import segmentation_metrics
from explora.eval.sliding import sliding_window_probs
from explora.models.adapt import PRESETS, ExploraSpec, apply_explora, apply_preset
from explora.models.backbone import build_backbone
from explora.models.checkpoints import convert_checkpoint, load_checkpoint_file
from explora.models.encoder import Encoder, as_encoder
from explora.models.export import (
    export_backbone,
    export_classifier,
    load_encoder,
    weights_license,
    write_timm_config,
)
from explora.models.group_channel import GroupChannelViT
from explora.models.model_card import write_model_card
from explora.models.params import ParamReport, parameter_report
from explora.models.record import ExploraRecord, record_of
from explora.models.seg_heads import SegmentationModel
from explora.models.temporal import TemporalViT
from explora.objectives.base import Objective, ObjectiveOutput
from explora.objectives.dinov2 import DinoV2Config, DinoV2Objective
from explora.objectives.mae import MAEConfig, MAEObjective
from explora.recipes.finetune import ClassifierModel, FinetuneObjective, prepare_classifier, run_finetune
from explora.recipes.predict import load_segmenter, predict_scene
from explora.recipes.pretrain import PretrainConfig, load_config, run_pretrain
from explora.recipes.segment import prepare_segmenter, run_segment
from explora.vit.lora import LoRALinear, LoRAQKV, inject_lora, merge_lora, merged_state_dict, unmerge_lora

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ClassifierModel",
    "ConfigError",
    "DataError",
    "DinoV2Config",
    "DinoV2Objective",
    "DivergenceError",
    "Encoder",
    "ExploraError",
    "ExploraRecord",
    "ExploraSpec",
    "FinetuneObjective",
    "GroupChannelViT",
    "LinearProbeConfig",
    "LoRALinear",
    "LoRAQKV",
    "MAEConfig",
    "MAEObjective",
    "MultiCrop",
    "Objective",
    "ObjectiveOutput",
    "OptimConfig",
    "ParamReport",
    "PretrainConfig",
    "SegmentationModel",
    "StepOutput",
    "TemporalViT",
    "TrainConfig",
    "TrainResult",
    "apply_explora",
    "apply_preset",
    "as_encoder",
    "build_backbone",
    "build_dataset",
    "check_dataset",
    "compute_stats",
    "convert_checkpoint",
    "export_backbone",
    "export_classifier",
    "extract_features",
    "forward_backward",
    "inject_lora",
    "knn_classify",
    "load_checkpoint_file",
    "load_config",
    "load_encoder",
    "load_segmenter",
    "merge_lora",
    "merged_state_dict",
    "parameter_report",
    "predict_scene",
    "prepare_classifier",
    "prepare_segmenter",
    "record_of",
    "run_finetune",
    "run_pretrain",
    "run_segment",
    "segmentation_metrics",
    "sliding_window_probs",
    "train",
    "train_linear_probe",
    "unmerge_lora",
    "weights_license",
    "write_model_card",
    "write_timm_config",
    "__version__",
]
