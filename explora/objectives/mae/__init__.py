"""MAE objective (RGB, SatMAE group-channel, SatMAE temporal) for ExPLoRA pre-training."""

from explora.objectives.mae.config import MAEConfig
from explora.objectives.mae.decoder import MAEDecoder, load_decoder_state
from explora.objectives.mae.masking import Mask, draw_noise, random_masking, shared_masking
from explora.objectives.mae.objective import (
    AllTokenPool,
    MAEBatchTransform,
    MAEObjective,
    build_feature_extractor,
    encode_visible,
)
from explora.objectives.mae.variants import (
    MAE_OBJECTIVES,
    GroupChannelMAEObjective,
    TemporalMAEObjective,
    build_mae_objective,
)

__all__ = [
    "MAE_OBJECTIVES",
    "AllTokenPool",
    "GroupChannelMAEObjective",
    "MAEBatchTransform",
    "MAEConfig",
    "MAEDecoder",
    "MAEObjective",
    "Mask",
    "TemporalMAEObjective",
    "build_feature_extractor",
    "build_mae_objective",
    "draw_noise",
    "encode_visible",
    "load_decoder_state",
    "random_masking",
    "shared_masking",
]
