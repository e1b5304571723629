"""ExPLoRA's MAE objective: continue masked reconstruction on target-domain images (paper-notes 1.5).

:class:`MAEObjective` is plain RGB (MAE, He et al. 2022) and the shape the paper's other two input kinds share:
multispectral with SatMAE group-channel tokens and SatMAE temporal frames (Cong et al. 2022), one subclass each in
``variants.py``. The encoder runs on visible tokens only; the decoder comes from the checkpoint's
``record_of(backbone).mae_decoder`` when it has one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from explora.core.errors import ConfigError, DataError
from explora.models.backbone import input_size
from explora.models.classifier import PooledEncoder
from explora.models.params import ParamReport, parameter_report
from explora.models.record import ExploraRecord, record_of
from explora.objectives.base import BatchTransform, Objective, ObjectiveOutput
from explora.objectives.mae.augment import random_resized_crop_flip, to_float
from explora.objectives.mae.config import MAEConfig
from explora.objectives.mae.decoder import MAEDecoder, load_decoder_state
from explora.objectives.mae.loss import masked_mse, normalize_patches, patchify
from explora.objectives.mae.masking import Mask, draw_noise, gather_tokens, random_masking, shared_masking
from explora.vit.cast_cache import FrozenWeightCastCache
from explora.vit.tokens import run_blocks


@dataclass
class MAEBatchTransform:
    """Picklable worker-side transform: crop + flip, normalise, draw the masking noise.

    Call as ``t(images, generator)`` or, for temporal input, ``t(images, generator, timestamps=ts)`` with images
    (B, T*C, H, W) (frames stacked along channels in time order; one crop shared by all frames) and ts (B, T, 3)
    = (year, month, hour). Returns ``{"images", "noise"}`` (+ ``"timestamps"``); noise is (B, slices*L), or (B, L)
    when one mask is shared by all groups/frames.
    """

    img_size: int
    patch_size: int
    slices: int = 1
    shared: bool = False
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    needs_timestamps: bool = False

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator, timestamps: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        x = random_resized_crop_flip(
            to_float(images), self.img_size, generator, self.crop_scale, self.crop_ratio, self.hflip
        )  # (B, C, S, S)
        if self.mean is not None:
            reps = x.shape[1] // len(self.mean)
            if reps * len(self.mean) != x.shape[1]:
                raise DataError(f"{len(self.mean)} mean/std values do not divide {x.shape[1]} input channels")
            mean = torch.tensor(self.mean).repeat(reps)[None, :, None, None]
            std = torch.tensor(self.std).repeat(reps)[None, :, None, None]
            x = (x - mean) / std
        L = (self.img_size // self.patch_size) ** 2
        noise = draw_noise(x.shape[0], L if self.shared else self.slices * L, generator)
        out = {"images": x, "noise": noise}
        if self.needs_timestamps:
            if timestamps is None:
                raise DataError("the temporal MAE batch transform needs timestamps (B, T, 3) = (year, month, hour)")
            out["timestamps"] = torch.as_tensor(timestamps)
        return out


# Which reconstruction targets a checkpoint's decoder was trained on, as build_backbone records it in
# ExploraRecord.mae_decoder_targets (MAE README: "MAE (visualize)" = raw pixels, "*_full" = norm-pix).
_TARGET_NAMES = {"pixel": "raw pixels", "norm_pix": "norm-pix targets"}
_TARGET_CHECKPOINTS = {"pixel": "mae_visualize_*", "norm_pix": "mae_pretrain_*_full"}


def warn_decoder_targets(record: ExploraRecord, norm_pix_loss: bool) -> None:
    """Note (once, as a warning) when the checkpoint's decoder was trained on the other kind of targets.

    Unknown (None / absent) says nothing. Pixel decoder + norm-pix loss is what the official ExPLoRA MAE recipe
    does (``mae_visualize_vit_large.pth`` with ``--norm_pix_loss``, paper-notes 9), so this is a note, not an error.
    """
    trained_on = record.mae_decoder_targets
    wanted = "norm_pix" if norm_pix_loss else "pixel"
    if trained_on not in _TARGET_NAMES or trained_on == wanted:
        return
    source = record.source or "the checkpoint"
    if trained_on == "pixel":
        advice = ("the official ExPLoRA MAE recipe does exactly this (mae_visualize_vit_large.pth continued with "
                  "norm_pix_loss); set mae.norm_pix_loss=false to keep the decoder's own targets")
    else:
        advice = ("set mae.norm_pix_loss=true to keep the decoder's own targets, or start from mae_visualize_* "
                  "(a raw-pixel decoder)")
    warnings.warn(
        f"MAE decoder from {source} was trained on {_TARGET_NAMES[trained_on]} ({_TARGET_CHECKPOINTS[trained_on]}); "
        f"this run continues it with {_TARGET_NAMES[wanted]} (mae.norm_pix_loss={str(norm_pix_loss).lower()}): "
        f"{advice}",
        stacklevel=3,
    )


def encode_visible(vit: nn.Module, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """timm ViT on visible patches only: (B, C, H, W), ids_keep (B, K) -> (B, P + K, D).

    Uses timm's own ``patch_embed`` and ``_pos_embed`` (pos-embed resampled to the grid, cls/register tokens with
    their positions), then keeps the visible patch tokens, as MAE's ``forward_encoder`` does.
    """
    x = vit._pos_embed(vit.patch_embed(images))  # (B, P + L, D)
    P = vit.num_prefix_tokens
    x = torch.cat([x[:, :P], gather_tokens(x[:, P:], ids_keep)], dim=1)  # (B, P + K, D)
    return run_blocks(vit, x)


class MAEObjective(Objective):
    """Masked reconstruction of RGB images with an MAE decoder (He et al. 2022), and the shared shape of the
    SatMAE variants (``objectives/mae/variants.py``), which override the hooks marked below.

    Pick the class for a config with :func:`explora.objectives.mae.variants.build_mae_objective`
    (``config.kind``); each class accepts only its own kind.
    """

    name = "mae"
    kind = "rgb"  # the MAEConfig.kind this class implements
    needs_timestamps = False  # batches carry (B, T, 3) timestamps
    strict_decoder = True  # the checkpoint's decoder must fit exactly (the variants add their own decoder parts)

    def __init__(self, backbone: nn.Module, config: MAEConfig | None = None) -> None:
        super().__init__()
        cfg = config or MAEConfig(kind=self.kind)
        if cfg.kind != self.kind:
            raise ConfigError(f"{type(self).__name__} implements mae.kind={self.kind!r}, got {cfg.kind!r}: build it "
                              "with explora.objectives.mae.build_mae_objective(backbone, config), which picks the "
                              "class for the kind.")
        self.config = cfg
        pretrained = [p for p in backbone.parameters() if not p.requires_grad]  # frozen by apply_explora
        patch = backbone.patch_embed.patch_size
        base_patch = int(patch[0] if isinstance(patch, tuple) else patch)
        self.patch_size = int(cfg.patch_size or base_patch)  # group-channel may use its own patch (SatMAE: 8)
        self.img_size = cfg.img_size or input_size(backbone)[0]  # the run's input size, not the stored pos grid
        if self.img_size % self.patch_size:
            raise ConfigError(f"mae.img_size {self.img_size} is not a multiple of the patch size {self.patch_size}")
        g = self.img_size // self.patch_size
        self.grid = (g, g)
        self.encoder, self.channels, self.decoder = self.build_encoder_decoder(backbone, dict(
            dim=cfg.decoder_dim, depth=cfg.decoder_depth, heads=cfg.decoder_heads, mlp_ratio=cfg.decoder_mlp_ratio))
        record = record_of(backbone)
        state = record.mae_decoder
        if state:
            load_decoder_state(self.decoder, state, strict=self.strict_decoder)
            warn_decoder_targets(record, cfg.norm_pix_loss)
        else:
            warnings.warn(
                "MAE checkpoint has no decoder (encoder-only weights, e.g. mae_pretrain_vit_*.pth): the decoder "
                "is freshly initialised; use an encoder+decoder checkpoint (mae_visualize_vit_*.pth or "
                "*_full.pth) to start from the pre-trained decoder",
                stacklevel=2,
            )
        self.decoder.requires_grad_(cfg.train_decoder)
        if cfg.decoder_lora_rank:  # MAEConfig guarantees train_decoder here
            self.decoder.lora_tune(cfg.decoder_lora_rank, cfg.decoder_lora_alpha, cfg.decoder_lora_targets)
        self._cast_cache = FrozenWeightCastCache()  # one bf16 copy of each frozen weight under autocast
        self.record_frozen(pretrained)  # the encoder's pre-trained tensors; the decoder is always checkpointed

    # -- hooks of the variants ---------------------------------------------------------------------------------
    def build_encoder_decoder(self, backbone: nn.Module, dec_kw: dict) -> tuple[nn.Module, int, MAEDecoder]:
        """The encoder, the input channel count and the decoder (``dec_kw``: its size settings)."""
        channels = backbone.patch_embed.proj.in_channels
        return backbone, channels, MAEDecoder(backbone.embed_dim, self.grid, self.patch_size, channels, **dec_kw)

    @property
    def slices(self) -> int:
        """Token sets per image position: 1 for RGB, the band groups or the frames of the variants."""
        return 1

    @property
    def shared_mask(self) -> bool:
        """One mask for every slice (the batch transform draws (B, L) noise instead of (B, slices*L))."""
        return False

    def target_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel targets before normalisation: (B, N, p*p*C)."""
        return patchify(images, self.patch_size)

    def encode(self, batch: dict[str, torch.Tensor], mask: Mask) -> tuple[torch.Tensor, tuple[int, int],
                                                                        torch.Tensor | None, torch.Tensor | None]:
        """Visible tokens through the encoder: (latent, grid, slice encoding, prefix slice encoding) for the
        decoder (the encodings are None for RGB)."""
        images = batch["images"]
        latent = encode_visible(self.encoder, images, mask.ids_keep)
        return latent, (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size), None, None

    def loss_from(self, pred: torch.Tensor | list[torch.Tensor], target: torch.Tensor, mask: Mask) -> torch.Tensor:
        return masked_mse(pred, target, mask.mask)

    # -- shared ------------------------------------------------------------------------------------------------
    def batch_transform(self) -> BatchTransform:
        cfg = self.config
        return MAEBatchTransform(
            img_size=self.img_size, patch_size=self.patch_size, slices=self.slices, shared=self.shared_mask,
            crop_scale=tuple(cfg.crop_scale), crop_ratio=tuple(cfg.crop_ratio), hflip=cfg.hflip,
            mean=cfg.mean, std=cfg.std, needs_timestamps=self.needs_timestamps,
        )

    def make_mask(self, noise: torch.Tensor) -> Mask:
        """Noise (B, R*L) -> independent mask; (B, L) with R > 1 slices -> same positions in every slice."""
        L = self.grid[0] * self.grid[1]
        if self.slices > 1 and noise.shape[1] == L:
            return shared_masking(noise, self.slices, self.config.mask_ratio)
        if noise.shape[1] != self.slices * L:
            raise DataError(f"MAE noise has {noise.shape[1]} tokens, expected {self.slices * L} or {L}")
        return random_masking(noise, self.config.mask_ratio)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel targets (B, N, p*p*C); norm_pix statistics over each (multi-band) patch."""
        t = self.target_patches(images)
        return normalize_patches(t, self.config.norm_pix_eps) if self.config.norm_pix_loss else t

    def predict(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor | list[torch.Tensor], Mask]:
        """Encoder on visible tokens, decoder on all: returns predictions and the mask."""
        mask = self.make_mask(batch["noise"].to(batch["images"].device))
        latent, grid, slice_enc, prefix_slice_enc = self.encode(batch, mask)
        pred = self.decoder(latent, mask.ids_restore, grid, self.encoder.num_prefix_tokens, slice_enc,
                            prefix_slice_enc)
        return pred, mask

    def forward(self, batch: dict[str, torch.Tensor], step: int = 0) -> ObjectiveOutput:  # type: ignore[override]
        with self._cast_cache.under_autocast(batch["images"].device):
            pred, mask = self.predict(batch)
        target = self.targets(batch["images"])
        loss = self.loss_from(pred, target, mask)
        return ObjectiveOutput(loss, {"mae_loss": loss.detach(), "mask_ratio": mask.mask.mean().detach()})

    def export_backbone(self) -> nn.Module:
        """The encoder: the timm ViT for RGB, the GroupChannelViT / TemporalViT wrapper otherwise."""
        return self.encoder

    def extra_modules(self) -> dict[str, nn.Module]:
        """Trained modules outside the paper's backbone count, for ``parameter_report(..., extra=...)``.

        The decoder is listed whatever ``train_decoder`` says (it then counts 0 trainable parameters). The new
        group/temporal encodings and group patch projections live in the encoder and are counted there
        (``embeddings`` group).
        """
        return {"decoder": self.decoder}

    def parameter_report(self) -> ParamReport:
        """Trainable parameters of the encoder per ExPLoRA group, with the decoder as ``extra``."""
        return parameter_report(self.encoder, extra=self.extra_modules())


# Downstream pooling is the encoder's (explora.models.encoder.Encoder.pool); this name is kept for older imports.
AllTokenPool = PooledEncoder


def build_feature_extractor(encoder: nn.Module) -> PooledEncoder:
    """An exported MAE encoder (timm ViT, GroupChannelViT or TemporalViT) as ``images [, timestamps] -> (B, D)``:
    the mean of its normed output over all non-prefix tokens (SatMAE's fine-tuning pooling)."""
    return PooledEncoder(encoder, "avg")
