"""DinoV2 objective: heads, DINO/iBOT/KoLeo losses, centering + Sinkhorn-Knopp, block masking, the objective."""

from explora.objectives.dinov2.centering import EMACenter, sinkhorn_knopp
from explora.objectives.dinov2.config import DinoV2Config
from explora.objectives.dinov2.heads import DINOHead
from explora.objectives.dinov2.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from explora.objectives.dinov2.masking import BlockMaskSampler, MaskingGenerator
from explora.objectives.dinov2.objective import DinoV2BatchTransform, DinoV2Objective

__all__ = ["BlockMaskSampler", "DINOHead", "DINOLoss", "DinoV2BatchTransform", "DinoV2Config", "DinoV2Objective",
           "EMACenter", "KoLeoLoss", "MaskingGenerator", "iBOTPatchLoss", "sinkhorn_knopp"]
