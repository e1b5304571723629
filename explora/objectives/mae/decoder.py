"""The MAE decoder (He et al. 2022, section 3 "MAE decoder"), with SatMAE's per-slice encodings and heads.

Layout and parameter names follow MAE checkpoints so their decoders load directly: ``decoder_embed`` (D -> 512),
``mask_token`` (1, 1, 512), ``decoder_pos_embed`` (1, 1 + L, 512, fixed 2-D sin-cos, cls row zero),
``decoder_blocks.<i>`` (timm ``Block``, 16 heads, MLP ratio 4, qkv bias, LayerNorm eps 1e-6), ``decoder_norm``,
``decoder_pred`` (512 -> p*p*C). For group-channel / temporal inputs the spatial part of the position encoding is
narrower and a per-slice (group id or timestamp) encoding fills the rest, as in SatMAE's decoders; group-channel
decoders have one prediction head per group (``decoder_pred.<g>``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from functools import partial

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from explora.core.errors import CheckpointError
from explora.models.adapt import is_norm
from explora.objectives.mae.masking import gather_tokens
from explora.vit.lora import inject_lora
from explora.vit.sincos import sincos_2d

DECODER_PREFIXES = ("decoder_embed.", "mask_token", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.",
                    "decoder_pred.")


class MAEDecoder(nn.Module):
    """Lightweight transformer that fills removed tokens with a mask token and predicts their pixels."""

    def __init__(
        self,
        embed_dim: int,
        grid: tuple[int, int],
        patch_size: int,
        out_chans: int | Sequence[int] = 3,
        dim: int = 512,
        depth: int = 8,
        heads: int = 16,
        mlp_ratio: float = 4.0,
        slice_dim: int = 0,
    ) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.slice_dim = slice_dim
        self.decoder_embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = torch.cat([torch.zeros(1, dim - slice_dim), sincos_2d(dim - slice_dim, self.grid)])  # (1+L, Ds)
        self.register_buffer("decoder_pos_embed", pos[None])  # fixed, as in MAE (requires_grad=False there)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)
        )
        self.decoder_norm = norm(dim)
        if isinstance(out_chans, int):
            self.decoder_pred: nn.Module = nn.Linear(dim, patch_size * patch_size * out_chans)
            self.grouped = False
        else:
            self.decoder_pred = nn.ModuleList(nn.Linear(dim, patch_size * patch_size * c) for c in out_chans)
            self.grouped = True
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE's initialisation: xavier-uniform Linear, zero bias, unit LayerNorm, mask token N(0, 0.02)."""
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def lora_tune(self, rank: int, alpha: float | None = None, targets: Sequence[str] = ("q", "v")) -> list[str]:
        """Freeze the decoder, put LoRA on ``targets`` of every ``decoder_blocks.<i>``, train the norms.

        The official ExPLoRA MAE script (paper-notes 9, ``mae/pretrain.py``): LoRA r8 on Q, V of every decoder
        block, and every parameter whose name contains ``norm`` trains (``decoder_blocks.*.norm1/norm2``,
        ``decoder_norm``); ``decoder_embed``, ``decoder_pred``, ``mask_token`` stay frozen (``decoder_pos_embed``
        is a fixed buffer). Returns the names of the layers that got LoRA.
        """
        self.requires_grad_(False)
        replaced = inject_lora(self, None, targets, rank, alpha, blocks_attr="decoder_blocks")
        for m in self.modules():
            if is_norm(m):
                m.requires_grad_(True)
        return replaced

    def positions(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, Ds) cls position and (1, L, Ds) spatial positions at ``grid`` (resampled when it differs)."""
        cls, spatial = self.decoder_pos_embed[:, :1], self.decoder_pos_embed[:, 1:]
        if tuple(grid) != self.grid:
            spatial = resample_abs_pos_embed(spatial, new_size=grid, old_size=self.grid, num_prefix_tokens=0)
        return cls, spatial

    def forward(
        self,
        latent: torch.Tensor,
        ids_restore: torch.Tensor,
        grid: tuple[int, int],
        num_prefix: int = 1,
        slice_enc: torch.Tensor | None = None,
        prefix_slice_enc: torch.Tensor | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """latent (B, P + K, D) from the encoder; ids_restore (B, N); slice_enc (B|1, R, slice_dim) or None.

        ``prefix_slice_enc`` (1, 1, slice_dim): the slice part of the cls token's encoding; None = zeros. SatMAE's
        group-channel decoder gives the cls token the channel encoding of index G (one past the last group,
        ``decoder_channel_embed[:, -1:]``), its temporal decoder zeros. Returns (B, N, p*p*C), or for grouped
        heads G tensors (B, L, p*p*|g|).
        """
        x = self.decoder_embed(latent)  # (B, P + K, Dd)
        B, N = ids_restore.shape
        prefix, vis = x[:, : min(num_prefix, 1)], x[:, num_prefix:]  # the cls token only, registers dropped
        fill = self.mask_token.expand(B, N - vis.shape[1], -1)
        x = gather_tokens(torch.cat([vis, fill], dim=1), ids_restore)  # (B, N, Dd) in token order
        cls_pos, spatial = self.positions(grid)
        L = spatial.shape[1]
        R = N // L
        pos = spatial.expand(B, -1, -1).repeat(1, R, 1)  # (B, R*L, Ds), slice-major
        if self.slice_dim:
            if slice_enc is None:
                raise ValueError("this decoder needs a per-slice encoding (slice_dim > 0)")
            s = slice_enc.expand(B, -1, -1)[:, :, None].expand(-1, -1, L, -1).flatten(1, 2)  # (B, R*L, Dsl)
            pos = torch.cat([pos, s], dim=-1)
            if prefix_slice_enc is None:
                prefix_slice_enc = cls_pos.new_zeros(1, 1, self.slice_dim)
            cls_pos = torch.cat([cls_pos, prefix_slice_enc.to(cls_pos.dtype)], dim=-1)  # (1, 1, Dd)
        x = x + pos
        if prefix.shape[1]:
            x = torch.cat([prefix + cls_pos, x], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)[:, prefix.shape[1] :]  # (B, N, Dd)
        if not self.grouped:
            return self.decoder_pred(x)
        x = x.reshape(B, R, L, -1)  # (B, G, L, Dd)
        return [head(x[:, g]) for g, head in enumerate(self.decoder_pred)]


def decoder_state_from_checkpoint(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder entries of an MAE checkpoint's ``model`` dict (or of an already-split decoder dict)."""
    return {k: v for k, v in state.items() if k.startswith(DECODER_PREFIXES)}


def load_decoder_state(decoder: MAEDecoder, state: Mapping[str, torch.Tensor], strict: bool = True) -> list[str]:
    """Load MAE decoder weights; resamples ``decoder_pos_embed`` to the decoder's grid.

    strict: every decoder tensor must match (RGB objective). Otherwise tensors whose shape differs (e.g. the
    3-band ``decoder_pred`` for a multispectral decoder) keep their fresh initialisation and are returned.
    """
    own = decoder.state_dict()
    state = dict(decoder_state_from_checkpoint(state))
    pos = state.get("decoder_pos_embed")
    if pos is not None and pos.shape[-1] == own["decoder_pos_embed"].shape[-1]:
        old_l = pos.shape[1] - 1
        side = int(round(old_l**0.5))
        if side * side == old_l and (side, side) != decoder.grid:
            state["decoder_pos_embed"] = resample_abs_pos_embed(
                pos.float(), new_size=decoder.grid, old_size=(side, side), num_prefix_tokens=1
            )
    skipped = [k for k in own if k not in state or state[k].shape != own[k].shape]
    unexpected = [k for k in state if k not in own]
    if strict and (skipped or unexpected):
        raise CheckpointError(
            f"MAE decoder weights do not match the decoder: missing/mismatched {skipped[:6]}, "
            f"unexpected {unexpected[:6]} (expected MAE dec512d8b layout for this patch size and band count)"
        )
    decoder.load_state_dict({k: v for k, v in state.items() if k in own and k not in skipped}, strict=False)
    if skipped:
        warnings.warn(f"MAE decoder: kept fresh initialisation for {skipped}", stacklevel=2)
    return skipped
