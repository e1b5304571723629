"""The SatMAE variants of the MAE objective, and the factory that picks the class for ``mae.kind``.

Each variant overrides the hooks of :class:`~explora.objectives.mae.objective.MAEObjective` (encoder and decoder,
slices, shared mask, targets, encoding, loss); the masking, the decoder call, the loss terms and the engine
contract are shared. A new input kind is one class here and one entry in :data:`MAE_OBJECTIVES`.
"""

from __future__ import annotations

import torch
from torch import nn

from explora.models.group_channel import GroupChannelViT
from explora.models.temporal import TemporalViT, timestamp_encoding
from explora.objectives.mae.config import MAEConfig
from explora.objectives.mae.decoder import MAEDecoder
from explora.objectives.mae.loss import group_masked_mse, patchify
from explora.objectives.mae.masking import Mask, gather_tokens
from explora.objectives.mae.objective import MAEObjective
from explora.vit.sincos import sincos_1d


class GroupChannelMAEObjective(MAEObjective):
    """Multispectral MAE with SatMAE group-channel tokens: one token set per band group, a group embedding in
    the encoder and the decoder, the loss per group (``mae.group_loss``)."""

    kind = "group_channel"
    strict_decoder = False

    def build_encoder_decoder(self, backbone: nn.Module, dec_kw: dict) -> tuple[nn.Module, int, MAEDecoder]:
        cfg = self.config
        encoder = GroupChannelViT(backbone, cfg.groups, cfg.drop_bands, None, cfg.group_pos_mode, cfg.group_dim,
                                  cfg.patch_size)
        decoder = MAEDecoder(backbone.embed_dim, self.grid, self.patch_size, [len(gr) for gr in cfg.groups],
                             slice_dim=cfg.decoder_group_dim, **dec_kw)
        # SatMAE decoder_channel_embed: sin-cos of 0..G; rows 0..G-1 tag the groups, row G the cls token.
        # A fixed function of the config, so not part of checkpoints.
        self.register_buffer(
            "decoder_group_embed", sincos_1d(cfg.decoder_group_dim, torch.arange(len(cfg.groups) + 1))[None],
            persistent=False,
        )  # (1, G + 1, Dg)
        return encoder, max(max(gr) for gr in cfg.groups) + 1, decoder

    @property
    def slices(self) -> int:
        return len(self.config.groups)

    @property
    def shared_mask(self) -> bool:
        return self.config.spatial_mask

    def target_patches(self, images: torch.Tensor) -> torch.Tensor:
        return patchify(self.encoder.patch_embed.select_bands(images), self.patch_size)  # (B, L, p*p*C)

    def encode(self, batch: dict[str, torch.Tensor], mask: Mask):
        tokens, grid = self.encoder.embed(batch["images"])
        latent = self.encoder.encode(gather_tokens(tokens, mask.ids_keep))
        G = len(self.config.groups)
        return latent, grid, self.decoder_group_embed[:, :G], self.decoder_group_embed[:, G:]

    def loss_from(self, pred: torch.Tensor | list[torch.Tensor], target: torch.Tensor, mask: Mask) -> torch.Tensor:
        cfg = self.config
        return group_masked_mse(pred, target, mask.mask, cfg.groups, self.channels, cfg.group_loss)


class TemporalMAEObjective(MAEObjective):
    """SatMAE temporal MAE: T frames stacked along channels, a timestamp encoding in the encoder and the decoder
    (batches carry ``timestamps`` (B, T, 3) = (year, month, hour))."""

    kind = "temporal"
    needs_timestamps = True
    strict_decoder = False

    def build_encoder_decoder(self, backbone: nn.Module, dec_kw: dict) -> tuple[nn.Module, int, MAEDecoder]:
        cfg = self.config
        encoder = TemporalViT(backbone, cfg.num_frames, cfg.time_dim, cfg.time_offset)
        channels = backbone.patch_embed.proj.in_channels
        decoder = MAEDecoder(backbone.embed_dim, self.grid, self.patch_size, channels,
                             slice_dim=3 * cfg.decoder_time_dim, **dec_kw)
        return encoder, channels, decoder

    @property
    def slices(self) -> int:
        return self.config.num_frames

    @property
    def shared_mask(self) -> bool:
        return self.config.same_mask

    def target_patches(self, images: torch.Tensor) -> torch.Tensor:
        t = patchify(self.encoder.split_frames(images), self.patch_size)  # (B*T, L, p*p*C)
        return t.reshape(images.shape[0], -1, t.shape[-1])  # (B, T*L, p*p*C)

    def encode(self, batch: dict[str, torch.Tensor], mask: Mask):
        images = batch["images"]
        ts = batch["timestamps"].to(images.device)
        tokens, grid = self.encoder.embed(images, ts)
        latent = self.encoder.encode(gather_tokens(tokens, mask.ids_keep))
        shifted = self.encoder.shift_timestamps(ts)  # (B, T, 3) minus time_offset, as the encoder sees them
        slice_enc = timestamp_encoding(shifted, self.config.decoder_time_dim).to(latent.dtype)
        return latent, grid, slice_enc, None  # SatMAE temporal decoder: zeros for the cls token's time part


MAE_OBJECTIVES: dict[str, type[MAEObjective]] = {
    "rgb": MAEObjective,
    "group_channel": GroupChannelMAEObjective,
    "temporal": TemporalMAEObjective,
}


def build_mae_objective(backbone: nn.Module, config: MAEConfig | None = None) -> MAEObjective:
    """The MAE objective class for ``config.kind`` (``rgb``, ``group_channel``, ``temporal``) on ``backbone``."""
    config = config or MAEConfig()
    return MAE_OBJECTIVES[config.kind](backbone, config)
