"""Hyper-parameters of the DinoV2 objective.

Defaults are DinoV2's ``dinov2/configs/ssl_default_config.yaml`` (which ExPLoRA's repo copies as
``linprobe/configs/ssl_default_config.yaml``) with ExPLoRA's fMoW overrides (local crops 98 px for patch 14); the
comment on each field names the upstream key. ExPLoRA's own pre-training values are not public.
"""

from __future__ import annotations

from dataclasses import dataclass

from explora.core.errors import ConfigError

SPLIT_BACKWARD_MODES = ("auto", "none", "crop_size", "view")
IBOT_HEAD_KEYS = ("ibot_n_prototypes", "ibot_hidden_dim", "ibot_bottleneck_dim", "ibot_head_nlayers")


@dataclass
class DinoV2Config:
    """All knobs of :class:`~explora.objectives.dinov2.objective.DinoV2Objective`."""

    n_prototypes: int = 65536  # dino.head_n_prototypes
    hidden_dim: int = 2048  # dino.head_hidden_dim
    bottleneck_dim: int = 256  # dino.head_bottleneck_dim
    head_nlayers: int = 3  # dino.head_nlayers
    # DinoV2 trains the prototype layer's weight-norm gain g (dinov2/layers/dino_head.py); true freezes it at 1 as
    # DINO v1's norm_last_layer=True did
    freeze_weight_norm_gain: bool = False
    separate_head: bool = False  # ibot.separate_head
    # sizes of the separate iBOT head (used only with separate_head); None: the DINO head's value. Upstream's
    # ibot.head_* keys default to the same values as dino.head_*; its ViT-L/g recipes (configs/train/vitl14.yaml)
    # change only the dino ones, so reproducing them means ibot_bottleneck_dim: 256 next to bottleneck_dim: 384
    ibot_n_prototypes: int | None = None  # ibot.head_n_prototypes
    ibot_hidden_dim: int | None = None  # ibot.head_hidden_dim
    ibot_bottleneck_dim: int | None = None  # ibot.head_bottleneck_dim
    ibot_head_nlayers: int | None = None  # ibot.head_nlayers
    centering: str = "centering"  # train.centering: "centering" | "sinkhorn_knopp"
    center_momentum: float = 0.9  # DINOLoss/iBOTPatchLoss center_momentum
    sinkhorn_iterations: int = 3  # sinkhorn_knopp_teacher n_iterations
    dino_loss_weight: float = 1.0  # dino.loss_weight
    ibot_loss_weight: float = 1.0  # ibot.loss_weight
    koleo_loss_weight: float = 0.1  # dino.koleo_loss_weight
    # DINOv3 Gram anchoring (optional; dinov3 gram.loss_weight, 0 = off): the student's patch similarities are pulled
    # to those of the *source* model (its weights before this run, the ExPLoRA Gram teacher) on the same global crops
    gram_loss_weight: float = 0.0
    gram_remove_neg: bool = False  # dinov3 gram.remove_neg
    student_temp: float = 0.1  # DINOLoss/iBOTPatchLoss student_temp
    teacher_temp: float = 0.07  # teacher.teacher_temp
    warmup_teacher_temp: float = 0.04  # teacher.warmup_teacher_temp
    warmup_teacher_temp_steps: int = 37500  # teacher.warmup_teacher_temp_epochs (30) x OFFICIAL_EPOCH_LENGTH (1250)
    momentum_teacher: float = 0.992  # teacher.momentum_teacher
    final_momentum_teacher: float = 1.0  # teacher.final_momentum_teacher
    mask_probability: float = 0.5  # ibot.mask_sample_probability
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)  # ibot.mask_ratio_min_max
    n_local: int = 8  # crops.local_crops_number
    global_size: int = 224  # crops.global_crops_size
    local_size: int = 98  # crops.local_crops_size (96 upstream default; 98 in ExPLoRA's patch-14 configs)
    global_scale: tuple[float, float] = (0.32, 1.0)  # crops.global_crops_scale
    local_scale: tuple[float, float] = (0.05, 0.32)  # crops.local_crops_scale
    photometric: str = "rgb"  # not upstream: "multispectral" for non-RGB bands
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # augmentations.py: ImageNet normalisation
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # augmentations.py GaussianBlur p (see docs: upstream quirk)
    # not upstream (DinoV2 back-propagates the whole loss at once): back-propagate the loss in parts so that only one
    # part's activations are alive; same gradients up to summation order. "none" | "crop_size" | "view"
    # (DinoV2Objective.stage_plan); true/false mean "view"/"none". "auto": `explora pretrain` picks the fastest
    # setting whose predicted peak fits the device's memory (explora.recipes.memory.resolve_auto_memory); an
    # objective built directly with "auto" has no estimate and splits view by view, the lowest-memory mode
    split_backward: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.split_backward, bool):
            self.split_backward = "view" if self.split_backward else "none"
        if self.split_backward not in SPLIT_BACKWARD_MODES:
            raise ConfigError(f"dinov2.split_backward must be one of {', '.join(SPLIT_BACKWARD_MODES)} "
                              f"(or true/false), got {self.split_backward!r}")
        if self.centering not in ("centering", "sinkhorn_knopp"):
            raise ConfigError(f"dinov2.centering must be 'centering' or 'sinkhorn_knopp', got {self.centering!r}")
        lo, hi = self.mask_ratio_min_max
        if not 0 <= lo <= hi <= 1:
            raise ConfigError(f"dinov2.mask_ratio_min_max must satisfy 0 <= min <= max <= 1, got {(lo, hi)}")
        if self.gram_loss_weight < 0:
            raise ConfigError(f"dinov2.gram_loss_weight must be >= 0 (0 = no Gram anchoring), got "
                              f"{self.gram_loss_weight}")
        if not 0 <= self.mask_probability <= 1:
            raise ConfigError(f"dinov2.mask_probability must be in [0, 1], got {self.mask_probability}")
        if self.n_prototypes < 1 or self.bottleneck_dim < 1 or self.hidden_dim < 1 or self.head_nlayers < 1:
            raise ConfigError("dinov2.n_prototypes, hidden_dim, bottleneck_dim and head_nlayers must be positive")
        ibot = {k: getattr(self, k) for k in IBOT_HEAD_KEYS}
        for key, value in ibot.items():
            if value is not None and value < 1:
                raise ConfigError(f"dinov2.{key} must be positive or null (= the DINO head's value), got {value}")
        set_keys = [k for k, v in ibot.items() if v is not None]
        if set_keys and not self.separate_head:
            raise ConfigError(f"dinov2.{', '.join(set_keys)} size(s) the separate iBOT head, but "
                              f"dinov2.separate_head is false (iBOT shares the DINO head); set separate_head: true "
                              f"or remove them")

    def ibot_head_sizes(self) -> dict[str, int]:
        """Keyword arguments of the iBOT head's :class:`DINOHead`: each ``ibot_*`` size, or the DINO head's."""
        return dict(n_prototypes=self.ibot_n_prototypes or self.n_prototypes,
                    hidden_dim=self.ibot_hidden_dim or self.hidden_dim,
                    bottleneck_dim=self.ibot_bottleneck_dim or self.bottleneck_dim,
                    nlayers=self.ibot_head_nlayers or self.head_nlayers)
