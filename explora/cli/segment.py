"""``explora segment`` (train + evaluate a segmentation model) and ``explora predict`` (class maps of whole scenes).

The flags come from :class:`explora.recipes.segment_config.SegmentConfig` and
:class:`~explora.recipes.segment_config.PredictConfig`; ``explora segment`` writes ``metrics.json``, the report and
``best/`` into ``--out``, and ``explora predict --run`` reads that directory back.
"""

from __future__ import annotations

import argparse

from explora.cli.config_args import add_config_arguments, config_from_args
from explora.recipes.predict import run_predict
from explora.recipes.segment_config import PredictConfig, SegmentConfig, run_segment_config


def _segment(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    m = run_segment_config(cfg)
    print(
        f"[explora] segmentation ({cfg.mode}, {cfg.head}): mIoU {m['miou']:.2f} (over chips {m['miou_chip_mean']:.2f}"
        f" ± {m['miou_chip_se']:.2f}; best {m['best_miou']:.2f} at step {m['best_step']}, saved in {m['best_dir']}); "
        f"{cfg.out}/metrics.json, {cfg.out}/report.md"
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    for r in run_predict(config_from_args(args)):
        extra = f", {r['probs']}" if "probs" in r else ""
        print(f"[explora] predict {r['input']}: {r['windows']} windows -> {r['classes']}{extra}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="semantic segmentation: frozen / LoRA-r8 / full encoder, linear or UPerNet head, mIoU",
        description="Train on a dense dataset (seg_folder:, seg_csv:, spacenet:) and evaluate on --val-data; the best "
        "model by validation mIoU is kept in OUT/best, the report in OUT/report.md.",
    )
    add_config_arguments(p, SegmentConfig)
    p.set_defaults(func=_segment)

    p = sub.add_parser(
        "predict",
        help="sliding-window class maps (PNG, or GeoTIFF keeping the georeferencing) of whole scenes",
    )
    add_config_arguments(p, PredictConfig)
    p.set_defaults(func=_predict)
