"""MAE objective settings, each default naming its source (MAE = He et al. CVPR 2022; SatMAE = Cong et al. 2022)."""

from __future__ import annotations

from dataclasses import dataclass, field

from explora.core.errors import ConfigError
from explora.models.group_channel import SENTINEL2_GROUPS
from explora.vit.lora import split_lora_targets


@dataclass
class MAEConfig:
    """Everything the MAE objective needs; every field is overridable from the run config."""

    kind: str = "rgb"  # "rgb" | "group_channel" | "temporal"
    mask_ratio: float = 0.75  # MAE main_pretrain.py default; SatMAE Sentinel default too
    norm_pix_loss: bool = True  # MAE's main results (PRETRAIN.md); False for "pixel" checkpoints
    norm_pix_eps: float = 1e-6  # MAE forward_loss
    decoder_dim: int = 512  # MAE dec512d8b
    decoder_depth: int = 8  # MAE dec512d8b
    decoder_heads: int = 16  # MAE dec512d8b
    decoder_mlp_ratio: float = 4.0  # MAE dec512d8b
    # Whether the decoder trains at all; how is decoder_lora_rank: 0 = every decoder parameter, > 0 = LoRA on
    # decoder_lora_targets of every decoder block + the decoder's norms, the rest frozen. The official ExPLoRA MAE
    # script LoRA-tunes the decoder at rank 8, lora_alpha 1 (scaling 1/8) (paper-notes 9, mae/pretrain.py).
    train_decoder: bool = True
    decoder_lora_rank: int = 0  # 0 = off
    decoder_lora_alpha: float | None = None  # None = rank (scaling 1); the official recipe's value is 1.0
    decoder_lora_targets: tuple[str, ...] = ("q", "v")  # official recipe: Q and V of decoder_blocks.<i>.attn.qkv
    # Augmentation in batch_transform: MAE uses RandomResizedCrop(scale=(0.2, 1.0), bicubic) + horizontal flip.
    img_size: int | None = None  # None: the backbone's input size (build_backbone img_size)
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop default
    hflip: bool = True
    mean: tuple[float, ...] | None = None  # per-band normalisation applied after the crop; None: leave values
    std: tuple[float, ...] | None = None
    # Group-channel (SatMAE models_mae_group_channels): groups over bands left after drop_bands.
    groups: tuple[tuple[int, ...], ...] = SENTINEL2_GROUPS
    drop_bands: tuple[int, ...] = ()  # (0, 9, 10) for raw 13-band Sentinel-2 (SatMAE --dropped_bands)
    # Patch of the group projections; None = the backbone's. SatMAE's multispectral ViT uses 8 at 96 px, where the
    # RGB MAE weights have 16: the RGB filter is resized (timm resample_patch_embed) to initialise the groups.
    patch_size: int | None = None
    group_pos_mode: str = "concat"  # SatMAE: [spatial (D-256) || group (256)]; "add" reuses the RGB pos-embed
    group_dim: int = 256  # SatMAE encoder channel_embed width
    decoder_group_dim: int = 128  # SatMAE decoder channel embed width
    spatial_mask: bool = False  # SatMAE: False = independent per group; True = same positions in every group
    # "per_group": each group head is scored against its own bands (SatMAE's stated loss). "satmae": the released
    # models_mae_group_channels.forward_loss, which concatenates the heads in group order and compares them with
    # the targets in band order (differs wherever the concatenated group order is not the band order).
    group_loss: str = "per_group"
    # Temporal (SatMAE models_mae_temporal): T frames, (year, month, hour) each encoded with time_dim sin-cos.
    num_frames: int = 3  # SatMAE fMoW-temporal
    time_dim: int = 128  # SatMAE encoder
    decoder_time_dim: int = 64  # SatMAE decoder
    same_mask: bool = False  # SatMAE: mask the same positions in every frame
    # Subtracted from the data layer's raw (year, month 1-12, hour 0-23) before encoding: SatMAE encodes
    # (year - 2002, month - 1, hour) (util/datasets.py, CustomDatasetFromImagesTemporal: min_year = 2002, "hard-coded
    # for fMoW"). Stored with the exported encoder, so downstream features encode time as pre-training did.
    time_offset: tuple[float, float, float] = (2002.0, 1.0, 0.0)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("rgb", "group_channel", "temporal"):
            raise ConfigError(f"mae.kind must be 'rgb', 'group_channel' or 'temporal', got {self.kind!r}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"mae.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"mae.crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if (self.mean is None) != (self.std is None):
            raise ConfigError("mae.mean and mae.std must be given together")
        self.groups = tuple(tuple(int(b) for b in g) for g in self.groups)
        self.drop_bands = tuple(int(b) for b in self.drop_bands)
        if self.patch_size is not None and self.kind != "group_channel":
            raise ConfigError(f"mae.patch_size applies to kind 'group_channel' only (got kind {self.kind!r}); "
                              "rgb and temporal use the backbone's patch embedding as it is")
        self._check_decoder_lora()
        if self.group_loss not in ("per_group", "satmae"):
            raise ConfigError(f"mae.group_loss must be 'per_group' or 'satmae', got {self.group_loss!r}")
        if self.kind == "group_channel" and self.group_loss == "satmae":
            bands = sorted(b for g in self.groups for b in g)
            if bands != list(range(len(bands))):
                raise ConfigError(
                    f"mae.group_loss='satmae' needs groups that cover bands 0..C-1 exactly once (the released "
                    f"SatMAE loss indexes the concatenated heads by band number), got groups {self.groups}"
                )
        if len(self.time_offset) != 3:
            raise ConfigError(f"mae.time_offset must be 3 numbers (year, month, hour), got {list(self.time_offset)}")
        self.time_offset = tuple(float(v) for v in self.time_offset)  # type: ignore[assignment]

    def _check_decoder_lora(self) -> None:
        """Decoder LoRA needs a decoder that trains: rank > 0 with train_decoder false is a contradiction."""
        rank = self.decoder_lora_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ConfigError(f"mae.decoder_lora_rank must be an integer >= 0 (0 = off), got {rank!r}")
        if rank and not self.train_decoder:
            raise ConfigError(
                f"mae.decoder_lora_rank={rank} LoRA-tunes the decoder, but mae.train_decoder is false (decoder "
                "frozen). Set train_decoder: true for a LoRA-tuned decoder, or decoder_lora_rank: 0 to freeze it."
            )
        if self.decoder_lora_alpha is not None and not self.decoder_lora_alpha > 0:
            raise ConfigError(f"mae.decoder_lora_alpha must be > 0 or null (= rank), got {self.decoder_lora_alpha}")
        self.decoder_lora_targets = tuple(str(t) for t in self.decoder_lora_targets)
        try:
            split_lora_targets(self.decoder_lora_targets)
        except ConfigError as err:
            raise ConfigError(f"mae.decoder_lora_targets: {err}") from None
