"""Configs of ``explora analyze`` (per-block PCA spectra, probes, attention maps) and ``explora compare-analyses``."""

from __future__ import annotations

from dataclasses import dataclass

from explora.analysis.blockwise import AnalysisConfig
from explora.analysis.probes import ProbeConfig
from explora.core.errors import ConfigError

_A, _P = AnalysisConfig, ProbeConfig


@dataclass
class AnalyzeConfig:
    """Which backbone on which images, and the knobs of :class:`~explora.analysis.blockwise.AnalysisConfig`."""

    model: str = ""  # backbone short name (e.g. dinov2_vitl14) or timm ViT name
    weights: str | None = None  # checkpoint path (upstream, ExPLoRA or merged export)
    data: str = ""  # dataset spec 'name:path[:opts]' (explora.data)
    out: str = ""  # output directory for analysis.json, config.yaml and the PNGs
    image_size: int | None = None  # input size (default: the backbone's)
    n_images: int = _A.n_images
    batch_size: int = _A.batch_size
    top_k: int = _A.top_k  # eigenvalues kept per image and block
    pca_norm: str = _A.pca_norm  # standardize or center
    patches_per_image: int = 64  # patches per image used by the probes (0: all)
    probe_iters: int = _P.max_iter  # L-BFGS iterations of the probes
    probe_weight_decay: float = _P.weight_decay
    n_visualize: int = _A.n_visualize
    foreground_threshold: float | None = None  # PCA-image foreground threshold
    device: str | None = None  # torch device (default: cpu)
    seed: int = 0

    def validate(self) -> None:
        for key in ("model", "data", "out"):
            if not getattr(self, key):
                raise ConfigError(f"explora analyze: {key} is required: give --{key} VALUE (or {key}=VALUE).")
        if self.pca_norm not in ("standardize", "center"):
            raise ConfigError(f"config.pca_norm: got {self.pca_norm!r}, expected 'standardize' or 'center'.")

    def analysis_config(self) -> AnalysisConfig:
        return AnalysisConfig(
            n_images=self.n_images, batch_size=self.batch_size, top_k=self.top_k, pca_norm=self.pca_norm,
            patches_per_image=self.patches_per_image or None, n_visualize=self.n_visualize,
            pca_foreground_threshold=self.foreground_threshold, seed=self.seed,
            probe=ProbeConfig(max_iter=self.probe_iters, weight_decay=self.probe_weight_decay),
        )


@dataclass
class CompareConfig:
    """Overlay two analysis.json files (e.g. before/after ExPLoRA)."""

    json_a: str = ""  # analysis.json (or its directory) of the first run
    json_b: str = ""  # analysis.json (or its directory) of the second run
    labels: tuple[str, str] = ("before", "after")  # legend labels of the two runs
    out: str = ""  # output PNG

    def validate(self) -> None:
        if not self.out:
            raise ConfigError("explora compare-analyses: out is required: give --out FILE.png.")


__all__ = ["AnalyzeConfig", "CompareConfig"]
