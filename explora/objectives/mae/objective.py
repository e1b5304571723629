"""ExPLoRA's MAE objective: continue masked reconstruction on target-domain images (paper-notes 1.5).

One class covers the three input kinds of the paper: plain RGB (MAE, He et al. 2022), multispectral with
SatMAE group-channel tokens, and SatMAE temporal frames (Cong et al. 2022). The encoder runs on visible tokens
only; the decoder comes from the checkpoint's ``record_of(backbone).mae_decoder`` when it has one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from explora.core.errors import ConfigError, DataError
from explora.models.backbone import input_size
from explora.models.classifier import PooledEncoder
from explora.models.group_channel import GroupChannelViT
from explora.models.record import ExploraRecord, record_of
from explora.models.temporal import TemporalViT, timestamp_encoding
from explora.objectives.base import BatchTransform, Objective, ObjectiveOutput
from explora.objectives.mae.augment import random_resized_crop_flip, to_float
from explora.objectives.mae.config import MAEConfig
from explora.objectives.mae.decoder import MAEDecoder, load_decoder_state
from explora.objectives.mae.loss import group_masked_mse, masked_mse, normalize_patches, patchify
from explora.objectives.mae.masking import Mask, draw_noise, gather_tokens, random_masking, shared_masking
from explora.vit.cast_cache import FrozenWeightCastCache
from explora.vit.sincos import sincos_1d
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
    """Masked reconstruction with an MAE decoder; ``config.kind`` picks 'rgb', 'group_channel' or 'temporal'."""

    name = "mae"

    def __init__(self, backbone: nn.Module, config: MAEConfig | None = None) -> None:
        super().__init__()
        cfg = config or MAEConfig()
        self.config = cfg
        patch = backbone.patch_embed.patch_size
        base_patch = int(patch[0] if isinstance(patch, tuple) else patch)
        self.patch_size = int(cfg.patch_size or base_patch)  # group-channel may use its own patch (SatMAE: 8)
        self.img_size = cfg.img_size or input_size(backbone)[0]  # the run's input size, not the stored pos grid
        if self.img_size % self.patch_size:
            raise ConfigError(f"mae.img_size {self.img_size} is not a multiple of the patch size {self.patch_size}")
        g = self.img_size // self.patch_size
        self.grid = (g, g)
        d = cfg.decoder_dim
        dec_kw = dict(dim=d, depth=cfg.decoder_depth, heads=cfg.decoder_heads, mlp_ratio=cfg.decoder_mlp_ratio)
        if cfg.kind == "rgb":
            self.encoder: nn.Module = backbone
            self.channels = backbone.patch_embed.proj.in_channels
            self.decoder = MAEDecoder(backbone.embed_dim, self.grid, self.patch_size, self.channels, **dec_kw)
        elif cfg.kind == "group_channel":
            self.encoder = GroupChannelViT(backbone, cfg.groups, cfg.drop_bands, None, cfg.group_pos_mode,
                                           cfg.group_dim, cfg.patch_size)
            self.channels = max(max(gr) for gr in cfg.groups) + 1
            self.decoder = MAEDecoder(backbone.embed_dim, self.grid, self.patch_size,
                                      [len(gr) for gr in cfg.groups], slice_dim=cfg.decoder_group_dim, **dec_kw)
            # SatMAE decoder_channel_embed: sin-cos of 0..G; rows 0..G-1 tag the groups, row G the cls token.
            # A fixed function of the config, so not part of checkpoints.
            self.register_buffer(
                "decoder_group_embed", sincos_1d(cfg.decoder_group_dim, torch.arange(len(cfg.groups) + 1))[None],
                persistent=False,
            )  # (1, G + 1, Dg)
        else:
            self.encoder = TemporalViT(backbone, cfg.num_frames, cfg.time_dim, cfg.time_offset)
            self.channels = backbone.patch_embed.proj.in_channels
            self.decoder = MAEDecoder(backbone.embed_dim, self.grid, self.patch_size, self.channels,
                                      slice_dim=3 * cfg.decoder_time_dim, **dec_kw)
        record = record_of(backbone)
        state = record.mae_decoder
        if state:
            load_decoder_state(self.decoder, state, strict=cfg.kind == "rgb")
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

    @property
    def slices(self) -> int:
        return {"rgb": 1, "group_channel": len(self.config.groups), "temporal": self.config.num_frames}[
            self.config.kind
        ]

    def batch_transform(self) -> BatchTransform:
        cfg = self.config
        shared = (cfg.kind == "group_channel" and cfg.spatial_mask) or (cfg.kind == "temporal" and cfg.same_mask)
        return MAEBatchTransform(
            img_size=self.img_size, patch_size=self.patch_size, slices=self.slices, shared=shared,
            crop_scale=tuple(cfg.crop_scale), crop_ratio=tuple(cfg.crop_ratio), hflip=cfg.hflip,
            mean=cfg.mean, std=cfg.std, needs_timestamps=cfg.kind == "temporal",
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
        p, cfg = self.patch_size, self.config
        if cfg.kind == "group_channel":
            t = patchify(self.encoder.patch_embed.select_bands(images), p)  # (B, L, p*p*C)
        elif cfg.kind == "temporal":
            B = images.shape[0]
            t = patchify(self.encoder.split_frames(images), p)  # (B*T, L, p*p*C)
            t = t.reshape(B, -1, t.shape[-1])  # (B, T*L, p*p*C)
        else:
            t = patchify(images, p)
        return normalize_patches(t, cfg.norm_pix_eps) if cfg.norm_pix_loss else t

    def predict(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor | list[torch.Tensor], Mask]:
        """Encoder on visible tokens, decoder on all: returns predictions and the mask."""
        images = batch["images"]
        mask = self.make_mask(batch["noise"].to(images.device))
        kind = self.config.kind
        if kind == "rgb":
            latent = encode_visible(self.encoder, images, mask.ids_keep)
            grid, slice_enc, prefix_slice_enc = self._grid_of(images), None, None
        elif kind == "group_channel":
            tokens, grid = self.encoder.embed(images)
            latent = self.encoder.encode(gather_tokens(tokens, mask.ids_keep))
            G = len(self.config.groups)
            slice_enc, prefix_slice_enc = self.decoder_group_embed[:, :G], self.decoder_group_embed[:, G:]
        else:
            ts = batch["timestamps"].to(images.device)
            tokens, grid = self.encoder.embed(images, ts)
            latent = self.encoder.encode(gather_tokens(tokens, mask.ids_keep))
            shifted = self.encoder.shift_timestamps(ts)  # (B, T, 3) minus time_offset, as the encoder sees them
            slice_enc = timestamp_encoding(shifted, self.config.decoder_time_dim).to(latent.dtype)
            prefix_slice_enc = None  # SatMAE temporal decoder: zeros for the cls token's time part
        pred = self.decoder(latent, mask.ids_restore, grid, self.encoder.num_prefix_tokens, slice_enc,
                            prefix_slice_enc)
        return pred, mask

    def _grid_of(self, images: torch.Tensor) -> tuple[int, int]:
        return images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size

    def loss_from(self, pred: torch.Tensor | list[torch.Tensor], target: torch.Tensor, mask: Mask) -> torch.Tensor:
        if self.config.kind == "group_channel":
            cfg = self.config
            return group_masked_mse(pred, target, mask.mask, cfg.groups, self.channels, cfg.group_loss)
        return masked_mse(pred, target, mask.mask)

    def forward(self, batch: dict[str, torch.Tensor], step: int = 0) -> ObjectiveOutput:  # type: ignore[override]
        with self._cast_cache:
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

    def parameter_report(self):
        """Trainable parameters of the encoder per ExPLoRA group, with the decoder as ``extra``."""
        from explora.models.params import parameter_report

        return parameter_report(self.encoder, extra=self.extra_modules())


# Downstream pooling is the encoder's (explora.models.encoder.Encoder.pool); this name is kept for older imports.
AllTokenPool = PooledEncoder


def build_feature_extractor(encoder: nn.Module) -> PooledEncoder:
    """An exported MAE encoder (timm ViT, GroupChannelViT or TemporalViT) as ``images [, timestamps] -> (B, D)``:
    the mean of its normed output over all non-prefix tokens (SatMAE's fine-tuning pooling)."""
    return PooledEncoder(encoder, "avg")
