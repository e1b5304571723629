"""SatMAE-style grouped patch embedding for multispectral input, on top of a timm ViT's blocks.

Re-implemented from the description in Cong et al., "SatMAE: Pre-training Transformers for Temporal and
Multi-Spectral Satellite Imagery" (NeurIPS 2022), section 3.3 (group-channel tokens), not from its CC-BY-NC code.
Bands are split into groups (default: the Sentinel-2 grouping of SatMAE over the 10 bands kept after dropping
B1, B9, B10); each group has its own patch projection, so one image gives G*L tokens that share the ViT blocks.
ExPLoRA (Khanna et al., ICML 2025) initialises the ViT from RGB weights, so the group projections and the
position/group encodings are new parameters that must train (paper-notes section 1.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from torch import nn

from explora.core.errors import ConfigError
from explora.models.backbone import input_size
from explora.vit.sincos import sincos_1d, sincos_2d
from explora.vit.tokens import apply_mask_token, patch_grid_size, run_blocks

# SatMAE's default groups over the 10 Sentinel-2 bands left after dropping B1, B9, B10 (indices 0, 9, 10 of 13).
SENTINEL2_DROPPED_BANDS: tuple[int, ...] = (0, 9, 10)
SENTINEL2_GROUPS: tuple[tuple[int, ...], ...] = ((0, 1, 2, 6), (3, 4, 5, 7), (8, 9))


class _SlicedViT(nn.Module):
    """Shared body of the group-channel and temporal wrappers: R slices of L tokens through one ViT.

    The wrapped ViT's ``cls_token``, ``reg_token``, ``blocks`` and ``norm`` are the same module objects as in the
    backbone (no copies), so LoRA injected into the backbone is trained here and parameter names keep timm's
    ``blocks.<i>.`` form that the engine's layer-wise decay reads.

    Implements :class:`explora.models.encoder.Encoder` directly (it is our module, so no adapter is needed): a
    subclass provides ``kind``, :meth:`embed`, :meth:`export_config` / ``from_config`` and ``own_pos_embed``.
    """

    kind: ClassVar[str]
    pools: ClassVar[tuple[str, ...]] = ("cls", "avg", "cls+avg")
    default_pool: ClassVar[str] = "avg"  # SatMAE fine-tunes and evaluates these encoders on the mean of all tokens
    needs_timestamps: ClassVar[bool] = False

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.embed_dim = vit.embed_dim
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.cls_token = vit.cls_token
        self.reg_token = vit.reg_token
        self.no_embed_class = vit.no_embed_class
        self.norm_pre = vit.norm_pre
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.grad_checkpointing = False
        # The prefix position embedding of the RGB model (cls position); frozen copy, kept in the state dict.
        n = 0 if vit.no_embed_class or vit.pos_embed is None else vit.num_prefix_tokens
        self.register_buffer("prefix_pos", vit.pos_embed[:, :n].detach().clone() if n else torch.zeros(1, 0, 1))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def prefix(self, batch: int) -> torch.Tensor:
        """(B, P, D) cls/register tokens with their positions.

        SatMAE's group-channel and temporal encoders add no position, group or time encoding to the cls token.
        Here the cls token keeps the RGB model's own cls position (``prefix_pos``), the one its pre-trained value
        was learnt with: for MAE weights that row is zero (``get_2d_sincos_pos_embed(..., cls_token=True)``), so
        the cls token enters the blocks bare, exactly as in SatMAE.
        """
        parts = [t for t in (self.cls_token, self.reg_token) if t is not None]
        if not parts:
            return self.prefix_pos.new_zeros(batch, 0, self.embed_dim)
        prefix = torch.cat(parts, dim=1)
        if self.prefix_pos.shape[1]:
            prefix = prefix + self.prefix_pos
        return prefix.expand(batch, -1, -1)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.patch_size)

    def grid(self, x: torch.Tensor | tuple[int, int]) -> tuple[int, int]:
        """(h, w) patch grid of images ``x`` (B, C, H, W) (or an (H, W) size); each group / frame covers it once."""
        return patch_grid_size(x, self.patch_size)

    def embed(self, x: torch.Tensor, timestamps: torch.Tensor | None = None, masks: torch.Tensor | None = None,
              mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C, H, W) -> encoded tokens (B, R*L, D), slice-major, and the grid; ``masks`` (B, R*L) swap patch
        embeddings for ``mask_token`` before the encodings are added."""
        raise NotImplementedError

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) already position-encoded tokens -> (B, P + N, D) normed output."""
        return run_blocks(self, torch.cat([self.prefix(tokens.shape[0]), tokens], dim=1))

    def forward_features(self, x: torch.Tensor, timestamps: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) [+ timestamps] -> normed tokens (B, P + R*L, D)."""
        return self.encode(self.embed(x, timestamps)[0])

    def forward_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None,
                       mask_token: torch.Tensor | None = None,
                       timestamps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normed class token (B, D) (the token mean without one) and slice tokens (B, R*L, D)."""
        out = self.encode(self.embed(x, timestamps, masks, mask_token)[0])
        p = self.num_prefix_tokens
        return (out[:, 0] if self.cls_token is not None else out[:, p:].mean(1)), out[:, p:]

    def get_intermediate_layers(self, x: torch.Tensor, n: int | None = 1, norm: bool = True,
                                timestamps: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(slice tokens (B, R*L, D), prefix tokens (B, P, D)) after each of the last ``n`` blocks (all: None)."""
        tokens = self.embed(x, timestamps)[0]
        tokens = self.norm_pre(torch.cat([self.prefix(tokens.shape[0]), tokens], dim=1))  # (B, P + R*L, D)
        first = len(self.blocks) - (len(self.blocks) if n is None else n)
        outs = []
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens)
            if i >= first:
                outs.append(self.norm(tokens) if norm else tokens)
        p = self.num_prefix_tokens
        return [(t[:, p:], t[:, :p]) for t in outs]

    def pool(self, tokens: torch.Tensor, mode: str = "avg") -> torch.Tensor:
        """(B, P + N, D) normed tokens -> (B, D): ``avg`` is the mean over ALL non-prefix tokens (every group/frame
        and position), ``cls`` the class token, ``cls+avg`` both concatenated (B, 2D)."""
        return pool_tokens(tokens, mode, self.num_prefix_tokens, self.pools, self.kind)

    def pooled(self, x: torch.Tensor, mode: str = "avg", timestamps: torch.Tensor | None = None) -> torch.Tensor:
        """Images [+ timestamps] -> pooled (B, D) feature (``mode`` as :meth:`pool`)."""
        return self.pool(self.forward_features(x, timestamps), mode)

    def probe_features(self, x: torch.Tensor, n_blocks: int,
                       timestamps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen-feature probes' input: the all-token mean as one "CLS" feature (B, 1, D), no patch mean."""
        return self.pooled(x, "avg", timestamps)[:, None], None

    def forward(self, x: torch.Tensor, timestamps: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled feature over all R*L tokens: (B, D)."""
        return self.pooled(x, "avg", timestamps)


def pool_tokens(tokens: torch.Tensor, mode: str, num_prefix_tokens: int, pools: tuple[str, ...],
                kind: str) -> torch.Tensor:
    """``cls`` / ``avg`` / ``cls+avg`` pooling of normed tokens (B, P + N, D), shared by every encoder kind.

    ``cls`` is position 0 (as explora's classifiers always read it), ``avg`` the mean of the non-prefix tokens.
    """
    if mode not in pools:
        raise ConfigError(f"pool {mode!r}: a {kind} encoder pools with one of {list(pools)}")
    if mode not in ("cls", "avg", "cls+avg"):
        raise ConfigError(f"pool {mode!r} is not a pooling of the normed tokens; use the encoder's pooled(x, mode)")
    cls = tokens[:, 0]  # (B, D)
    avg = tokens[:, num_prefix_tokens:].mean(dim=1)  # (B, D)
    return {"cls": cls, "avg": avg, "cls+avg": torch.cat([cls, avg], dim=1)}[mode]


class GroupChannelPatchEmbed(nn.Module):
    """One patch projection per band group: (B, C, H, W) -> (B, G, L, D) plus the (1, G, L, D) encoding.

    Encoding (``pos_mode``): ``'concat'`` (SatMAE) = [2-D sin-cos spatial (D - group_dim) || 1-D sin-cos group id
    (group_dim)]; ``'add'`` = the RGB model's own pos-embed (D) + a D-wide sin-cos group encoding, which reuses the
    pre-trained positions. Both are trainable parameters initialised as stated (ExPLoRA unfreezes them).
    """

    def __init__(
        self,
        rgb_proj: nn.Conv2d,
        grid: tuple[int, int],
        groups: Sequence[Sequence[int]] = SENTINEL2_GROUPS,
        drop_bands: Sequence[int] = (),
        in_bands: int | None = None,
        pos_mode: str = "concat",
        group_dim: int = 256,
        rgb_pos: torch.Tensor | None = None,
        patch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.groups = tuple(tuple(int(b) for b in g) for g in groups)
        self.drop_bands = tuple(int(b) for b in drop_bands)
        self.in_bands = in_bands
        self.grid = tuple(grid)
        p = int(patch_size or rgb_proj.kernel_size[0])
        self.patch_size = (p, p)
        dim = rgb_proj.out_channels
        if pos_mode not in ("concat", "add"):
            raise ConfigError(f"group_channel pos_mode must be 'concat' or 'add', got {pos_mode!r}")
        if pos_mode == "concat" and not 0 < group_dim < dim:
            raise ConfigError(f"group_dim must be in (0, embed_dim={dim}) for pos_mode='concat', got {group_dim}")
        self.pos_mode = pos_mode
        self.group_dim = int(group_dim)
        self.proj = nn.ModuleList(self._init_group_proj(rgb_proj, len(g), p) for g in self.groups)
        g_ids = torch.arange(len(self.groups))
        if pos_mode == "concat":
            spatial = sincos_2d(dim - group_dim, self.grid)[None]  # (1, L, D - group_dim)
            group = sincos_1d(group_dim, g_ids)[None]  # (1, G, group_dim)
        else:
            if rgb_pos is not None and rgb_pos.shape[1] == self.grid[0] * self.grid[1]:
                spatial = rgb_pos.detach().clone()  # (1, L, D)
            else:
                spatial = sincos_2d(dim, self.grid)[None]
            group = sincos_1d(dim, g_ids)[None]  # (1, G, D)
        self.pos_embed = nn.Parameter(spatial)
        self.group_embed = nn.Parameter(group)

    @staticmethod
    def _init_group_proj(rgb: nn.Conv2d, n: int, patch: int | None = None) -> nn.Conv2d:
        """Mean RGB filter repeated over the group's n bands and scaled by 3/n (as timm's ``adapt_input_conv``).

        Why: for bands with RGB-like statistics the group's response then equals the RGB embedding's response
        to a grey image, so activations entering the pre-trained blocks keep their scale for any group size.
        A different ``patch`` (SatMAE's multispectral ViT uses 8 where the RGB MAE has 16) resizes the RGB filter
        with timm's ``resample_patch_embed`` (FlexiViT's pseudo-inverse resize, which keeps the token a patch
        produces), so the pre-trained blocks still see familiar token statistics.
        """
        p = int(patch or rgb.kernel_size[0])
        conv = nn.Conv2d(n, rgb.out_channels, p, p, bias=rgb.bias is not None)
        with torch.no_grad():
            c_in = rgb.weight.shape[1]
            w = rgb.weight.mean(dim=1, keepdim=True)  # (D, 1, p0, p0)
            if (p, p) != tuple(w.shape[-2:]):
                w = resample_patch_embed(w, [p, p])  # (D, 1, p, p)
            conv.weight.copy_(w.repeat(1, n, 1, 1) * (c_in / n))  # (D, n, p, p)
            if rgb.bias is not None:
                conv.bias.copy_(rgb.bias)
        return conv

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def select_bands(self, x: torch.Tensor) -> torch.Tensor:
        """Drop the configured bands: (B, C_in, H, W) -> (B, C_in - len(drop), H, W)."""
        if self.in_bands is not None and x.shape[1] != self.in_bands:
            raise ConfigError(f"group-channel input has {x.shape[1]} bands, expected in_bands={self.in_bands}")
        if self.drop_bands:
            keep = [b for b in range(x.shape[1]) if b not in self.drop_bands]
            x = x[:, keep]
        need = max(max(g) for g in self.groups) + 1
        if x.shape[1] < need:
            raise ConfigError(f"band groups {self.groups} need >= {need} bands after dropping, got {x.shape[1]}")
        return x

    def encoding(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, G, L, D) position+group encoding at the given grid (spatial part resampled when it differs)."""
        spatial = self.pos_embed
        if tuple(grid) != self.grid:
            spatial = resample_abs_pos_embed(spatial, new_size=grid, old_size=self.grid, num_prefix_tokens=0)
        G, L = self.num_groups, spatial.shape[1]
        s = spatial[:, None].expand(-1, G, -1, -1)  # (1, G, L, Ds)
        g = self.group_embed[:, :, None].expand(-1, -1, L, -1)  # (1, G, L, Dg)
        return torch.cat([s, g], dim=-1) if self.pos_mode == "concat" else s + g

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None,
                mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C, H, W) -> tokens (B, G, L, D) with encodings added, and the patch grid (h, w); ``masks`` (B, G*L)
        set patch embeddings to ``mask_token`` before the encodings are added."""
        x = self.select_bands(x)
        toks = [proj(x[:, list(g)]) for proj, g in zip(self.proj, self.groups)]  # G x (B, D, h, w)
        grid = tuple(toks[0].shape[-2:])
        t = torch.stack([t.flatten(2).transpose(1, 2) for t in toks], dim=1)  # (B, G, L, D)
        return apply_mask_token(t, masks, mask_token) + self.encoding(grid), grid


class GroupChannelViT(_SlicedViT):
    """A multispectral ViT: grouped patch embedding + the blocks/norm/cls of a timm ViT (sequence G*L + prefix)."""

    kind: ClassVar[str] = "group_channel"

    def __init__(
        self,
        vit: nn.Module,
        groups: Sequence[Sequence[int]] = SENTINEL2_GROUPS,
        drop_bands: Sequence[int] = (),
        in_bands: int | None = None,
        pos_mode: str = "concat",
        group_dim: int = 256,
        patch_size: int | None = None,
        img_size: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__(vit)
        base_patch = int(vit.patch_embed.proj.kernel_size[0])
        p = int(patch_size or base_patch)
        img = _pair(img_size) if img_size is not None else input_size(vit)  # the size the encodings are laid out for
        if img[0] % p or img[1] % p:
            raise ConfigError(f"group-channel patch_size {p} does not divide the backbone's image size {img}")
        self.img_size = img
        rgb_pos = _rgb_patch_pos(vit, (img[0] // base_patch, img[1] // base_patch))
        self.patch_embed = GroupChannelPatchEmbed(
            vit.patch_embed.proj, (img[0] // p, img[1] // p), groups, drop_bands, in_bands, pos_mode,
            group_dim, rgb_pos, p,
        )

    @property
    def num_groups(self) -> int:
        return self.patch_embed.num_groups

    @property
    def own_pos_embed(self) -> nn.Parameter:
        """The spatial encoding this encoder adds (trainable, new); exports record its grid."""
        return self.patch_embed.pos_embed

    @property
    def pos_embed_grid(self) -> tuple[int, int]:
        """The grid ``own_pos_embed`` is laid out on."""
        return self.patch_embed.grid

    def export_config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments: an export's sidecar stores them so the loader can rebuild us."""
        pe = self.patch_embed
        return {
            "kind": "group_channel",
            "groups": [list(g) for g in pe.groups],
            "drop_bands": list(pe.drop_bands),
            "in_bands": pe.in_bands,
            "pos_mode": pe.pos_mode,
            "group_dim": pe.group_dim,
            "patch_size": int(pe.patch_size[0]),
            "img_size": list(self.img_size),
        }

    @classmethod
    def from_config(cls, vit: nn.Module, config: dict[str, Any]) -> GroupChannelViT:
        """Inverse of :meth:`export_config` around a ViT of the same architecture (weights are loaded after).

        Configs written before ``img_size`` was recorded built the base ViT at that size: its ``patch_embed.img_size``.
        """
        return cls(vit, config["groups"], config.get("drop_bands", ()), config.get("in_bands"),
                   config.get("pos_mode", "concat"), int(config.get("group_dim", 256)), config.get("patch_size"),
                   config.get("img_size") or tuple(vit.patch_embed.img_size))

    def embed(self, x: torch.Tensor, timestamps: torch.Tensor | None = None, masks: torch.Tensor | None = None,
              mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C, H, W) -> position-encoded tokens (B, G*L, D), group-major, and the grid (timestamps unused)."""
        t, grid = self.patch_embed(x, masks, mask_token)  # (B, G, L, D)
        return t.flatten(1, 2), grid


def _rgb_patch_pos(vit: nn.Module, grid: tuple[int, int]) -> torch.Tensor | None:
    """The RGB model's patch position embedding (1, h*w, D) on ``grid``, resampled from its stored grid as timm's
    forward would (``resample_abs_pos_embed``, bicubic, antialias); None when the model has none."""
    if vit.pos_embed is None:
        return None
    n = 0 if vit.no_embed_class else vit.num_prefix_tokens
    pos = vit.pos_embed[:, n:].detach()  # (1, Hs*Ws, D)
    return resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(vit.patch_embed.grid_size),
                                  num_prefix_tokens=0)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


__all__ = [
    "SENTINEL2_DROPPED_BANDS",
    "SENTINEL2_GROUPS",
    "GroupChannelPatchEmbed",
    "GroupChannelViT",
]
