"""Per-block analyses of the paper: PCA spectra, position/class probes, attention maps, PCA feature images."""

from explora.analysis.attention import attention_maps, last_block_attention
from explora.analysis.blockwise import AnalysisConfig, analyze
from explora.analysis.pca_image import pca_feature_image
from explora.analysis.plots import compare_analyses
from explora.analysis.probes import ProbeConfig, blockwise_probes, class_probe, fit_linear_probes, position_probe
from explora.analysis.spectrum import patch_eigenvalues

__all__ = [
    "AnalysisConfig",
    "ProbeConfig",
    "analyze",
    "attention_maps",
    "class_probe",
    "compare_analyses",
    "blockwise_probes",
    "fit_linear_probes",
    "last_block_attention",
    "patch_eigenvalues",
    "pca_feature_image",
    "position_probe",
]
