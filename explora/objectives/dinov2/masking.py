"""iBOT block masking as DinoV2 samples it.

Two pieces, following the descriptions of BEiT (Bao et al., 2022, "blockwise masking", Algorithm 1) and DinoV2
(``dinov2/data/masking.py`` and ``dinov2/data/collate.py``), written from those descriptions:

- :class:`MaskingGenerator` draws one mask on a patch grid as a union of rectangles (aspect ratio log-uniform in
  [0.3, 1/0.3], area uniform between ``min_num_patches`` and what is still allowed, each adding at most
  ``max_num_patches`` new patches) until the requested count is reached or ten placements in a row fail. As
  upstream's loop, it keeps going when fewer than ``min_num_patches`` patches remain to be masked (the area is then
  drawn from [remaining, min_num_patches] and only blocks adding at most the remainder are accepted), which is how
  DinoV2 fills > 99.5% of the requested count even on a 7x7 grid.
- :class:`BlockMaskSampler` masks a fixed share (``mask_probability``) of the global crops of a batch; their
  ratios are spread over ``mask_ratio_min_max`` by splitting it into equal sub-intervals (one per masked crop,
  uniform inside each) so every batch sees light and heavy masking; the other crops get empty masks; the order
  is shuffled.

All randomness comes from an explicit ``torch.Generator`` (the engine seeds one per batch).
"""

from __future__ import annotations

import math

import torch


def _uniform(generator: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def _randint(generator: torch.Generator, lo: int, hi_inclusive: int) -> int:
    return int(torch.randint(lo, hi_inclusive + 1, (), generator=generator).item())


class MaskingGenerator:
    """BEiT block-wise mask on a ``(height, width)`` patch grid.

    Attributes:
        min_num_patches: smallest rectangle (patches); BEiT/DinoV2 use 4.
        max_num_patches: largest rectangle; DinoV2 passes half the grid.
        log_aspect: log of the aspect-ratio range, sampled uniformly (min_aspect .. 1/min_aspect by default).
        attempts: placements tried per rectangle before giving up (10 in BEiT).
    """

    def __init__(self, height: int, width: int | None = None, min_num_patches: int = 4,
                 max_num_patches: float | None = None, min_aspect: float = 0.3, max_aspect: float | None = None,
                 attempts: int = 10) -> None:
        self.height, self.width = height, width if width is not None else height
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = self.num_patches * 0.5 if max_num_patches is None else max_num_patches
        max_aspect = max_aspect if max_aspect is not None else 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.attempts = attempts

    def _place_block(self, mask: torch.Tensor, max_new: float, generator: torch.Generator) -> int:
        """Try up to ``attempts`` rectangles; mask the first that adds between 1 and ``max_new`` new patches.

        Returns how many patches it added (0: every attempt failed). Upstream ``MaskingGenerator._mask``: the
        area is ``uniform(min_num_patches, max_new)`` even when ``max_new < min_num_patches``.
        """
        for _ in range(self.attempts):
            area = _uniform(generator, self.min_num_patches, max_new)
            aspect = math.exp(_uniform(generator, *self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h < self.height and w < self.width:
                top = _randint(generator, 0, self.height - h)
                left = _randint(generator, 0, self.width - w)
                block = mask[top : top + h, left : left + w]  # view: (h, w)
                new = h * w - int(block.sum())
                if 0 < new <= max_new:
                    block.fill_(True)
                    return new
        return 0

    def __call__(self, num_masking_patches: int, generator: torch.Generator) -> torch.Tensor:
        """A (height, width) bool mask with at most ``num_masking_patches`` True entries (upstream ``__call__``)."""
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < num_masking_patches:
            max_new = min(num_masking_patches - count, self.max_num_patches)
            added = self._place_block(mask, max_new, generator)
            if added == 0:
                break
            count += added
        return mask


class BlockMaskSampler:
    """Masks for the ``n`` global crops of a batch, as DinoV2's collate draws them: (n, H*W) bool.

    Picklable (plain numbers only), so it can run inside data-loader workers.
    """

    def __init__(self, grid_size: int | tuple[int, int], mask_probability: float = 0.5,
                 mask_ratio_min_max: tuple[float, float] = (0.1, 0.5), min_num_patches: int = 4,
                 min_aspect: float = 0.3, max_fraction: float = 0.5) -> None:
        h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
        self.grid = (h, w)
        self.mask_probability = mask_probability
        self.mask_ratio_min_max = tuple(mask_ratio_min_max)
        self.generator = MaskingGenerator(h, w, min_num_patches=min_num_patches,
                                          max_num_patches=max_fraction * h * w, min_aspect=min_aspect)

    def __call__(self, n: int, generator: torch.Generator) -> torch.Tensor:
        h, w = self.grid
        n_tokens = h * w
        n_masked = int(n * self.mask_probability)
        bounds = torch.linspace(*self.mask_ratio_min_max, n_masked + 1).tolist()  # equal sub-intervals
        masks = []
        for i in range(n_masked):
            ratio = _uniform(generator, bounds[i], bounds[i + 1])
            masks.append(self.generator(int(n_tokens * ratio), generator).flatten())
        masks += [torch.zeros(n_tokens, dtype=torch.bool)] * (n - n_masked)
        order = torch.randperm(n, generator=generator)
        return torch.stack(masks)[order] if n else torch.zeros(0, n_tokens, dtype=torch.bool)  # (n, H*W)
