"""``explora demo``: see ExPLoRA work on a laptop CPU before reading any docs.

Starting from the real DinoV2 ViT-S/14, the demo measures a linear probe and kNN of the frozen model on the target
domain, runs ExPLoRA extended pre-training (``D-[L]-r64``) and the paper's two ablations at the same budget
(LoRA-only: no unfrozen block; unfreeze-only: no LoRA), measures each again, and writes ``report.md`` with loss
curves, an accuracy table and bar chart with trainable-parameter counts, PCA-of-patch-feature images and attention
maps before/after. Every number in the report is read from the metrics files this run wrote.

The target domain defaults to Fashion-MNIST (Debian's ``dataset-fashion-mnist`` location); ``--data`` takes any
dataset spec. Pre-training never reads labels; the probes use a fixed random subset of the labeled splits.

With ``--seg-data`` (a dense spec, e.g. ``seg_folder:/d:classes=2``), the demo adds a segmentation part: the frozen
DinoV2 and each adapted backbone, frozen, under a linear segmentation head trained by
:func:`explora.recipes.segment.run_segment` (PANGAEA's frozen-encoder protocol), mIoU on ``--seg-val-data``,
and a section of the report with their numbers.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from explora.core.io import atomic_write_bytes
from explora.core.precision import autocast_dtype
from explora.data.specs import build_dataset
from explora.engine.optim import build_optimizer
from explora.engine.step import forward_backward
from explora.engine.trainer import OptimConfig, TrainConfig
from explora.eval.features import eval_transform_for, extract_features
from explora.eval.knn import knn_classify
from explora.eval.linprobe import LinearProbeConfig, train_linear_probe
from explora.eval.metrics import load_metrics, save_metrics
from explora.models.adapt import ExploraSpec, apply_preset
from explora.models.backbone import backbone_patch_size, build_backbone
from explora.models.params import parameter_report
from explora.recipes.demo.report import write_report
from explora.recipes.demo.variants import VARIANTS, Variant  # noqa: F401  (Variant: public name)
from explora.recipes.pretrain import DataConfig, ModelConfig, PretrainConfig, build_objective, run_pretrain
from explora.recipes.segment import run_segment

_log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """CPU-sized defaults (see docs/demo.md for how they were chosen)."""

    model: str = "dinov2_vits14"
    weights: str | None = "default"
    data: str = ""  # "": Fashion-MNIST from Debian's dataset-fashion-mnist, else downloaded (default_data())
    out: str = "demo-out"
    image_size: int | None = None  # global crop and evaluation size; null: 4x4 patches (56 px; DINOv3: 64)
    local_size: int | None = None  # local crop size; null: 2x2 patches (28 px, DINOv3: 32)
    n_local: int = 2
    prototypes: int = 4096
    steps: int | None = None  # per variant; None: as many as fit in budget_minutes (measured on this machine)
    budget_minutes: float = 20.0
    min_steps: int = 5
    max_steps: int = 2000  # about one pass over Fashion-MNIST's 60,000 training images at batch 32
    batch_size: int = 32
    base_lr: float = 2e-4
    warmup_steps: int = 10
    n_train_eval: int = 1000
    n_test_eval: int = 500
    n_show: int = 6  # images in the PCA / attention figures
    variants: tuple[str, ...] = ("explora", "lora_only", "unfreeze_only")
    seed: int = 0
    num_workers: int = 1
    precision: str = "auto"  # bf16 where the hardware is fast at it, else fp32 (explora/core/precision.py)
    dinov2: dict[str, Any] = field(default_factory=dict)  # extra DinoV2 objective overrides
    seg_data: str = ""  # a dense dataset spec: adds a segmentation part (frozen encoders, linear head, mIoU)
    seg_val_data: str | None = None  # validation spec of the segmentation part (default: seg_data)
    seg_steps: int = 100  # training steps of each segmentation head
    seg_batch_size: int = 8

    @classmethod
    def smoke(cls, out: str, data: str) -> DemoConfig:
        """A seconds-long run on the tiny test architecture (random weights), for tests."""
        return cls(
            model="test_dinov2",
            weights=None,
            data=data,
            out=out,
            image_size=32,
            local_size=16,
            n_local=2,
            prototypes=64,
            steps=None,  # exercise the budget planner: it times a step, then clamps to [min_steps, max_steps]
            min_steps=2,
            max_steps=3,
            batch_size=4,
            warmup_steps=1,
            n_train_eval=40,
            n_test_eval=20,
            n_show=2,
            num_workers=0,
            precision="fp32",
            dinov2={"hidden_dim": 32, "bottleneck_dim": 16},
        )


DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def default_data() -> str:
    """Fashion-MNIST where Debian's ``dataset-fashion-mnist`` puts it, else torchvision's download into the cache."""
    if DEBIAN_FASHION_MNIST.is_dir():
        return f"fashion_mnist:{DEBIAN_FASHION_MNIST}:rgb=true"
    cache = Path.home() / ".cache" / "explora" / "fashion-mnist"
    return f"fashion_mnist:{cache}:rgb=true,download=true"


def resolve_sizes(cfg: DemoConfig) -> DemoConfig:
    """``cfg`` with the crop sizes left null set to 4x4 (global) and 2x2 (local) patches of its backbone."""
    if cfg.image_size is not None and cfg.local_size is not None:
        return cfg
    patch = backbone_patch_size(cfg.model)
    return replace(cfg, image_size=cfg.image_size or 4 * patch, local_size=cfg.local_size or 2 * patch)


def _pretrain_config(cfg: DemoConfig, variant: str):

    chosen = VARIANTS[variant]
    dinov2 = {
        "n_local": cfg.n_local,
        "global_size": cfg.image_size,
        "local_size": cfg.local_size,
        "local_scale": (0.10, 0.32),  # DinoV2's 0.05 is a few source pixels on 28-px images
        "n_prototypes": cfg.prototypes,
        "warmup_teacher_temp_steps": 0,
        "teacher_temp": 0.04,
        **cfg.dinov2,
    }
    return PretrainConfig(
        model=ModelConfig(name=cfg.model, weights=cfg.weights, img_size=cfg.image_size),
        adapt=ExploraSpec.from_preset(chosen.preset, **chosen.overrides),
        data=DataConfig(spec=cfg.data, image_size=cfg.image_size),
        objective="dinov2",
        dinov2=dinov2,
        optim=OptimConfig(
            base_lr=cfg.base_lr,
            lr_scaling="none",
            warmup_steps=min(cfg.warmup_steps, max(1, cfg.steps // 5)),
            freeze_last_layer_steps=0,
            weight_decay=0.04,
            weight_decay_end=0.04,
            layer_decay=1.0,
            patch_embed_lr_mult=1.0,
        ),
        train=TrainConfig(
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            precision=cfg.precision,
            num_workers=cfg.num_workers,
            log_every=1,
            ckpt_every=max(1, cfg.steps // 4),
            tensorboard=False,
        ),
        output_dir=str(Path(cfg.out) / "runs" / variant),
        export_formats=["safetensors"],
    )


def _eval_subset(dataset, n: int, seed: int):

    n = min(n, len(dataset))
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return Subset(dataset, idx)


def _evaluate(backbone, name: str, cfg: DemoConfig, train_set, test_set, stats_source, num_classes: int, out: Path):
    """Linear probe (DinoV2 protocol on cached features) and kNN of a frozen backbone -> metrics dict."""

    transform = eval_transform_for(stats_source, cfg.image_size, crop_pct=1.0)
    autocast = autocast_dtype(cfg.precision, torch.device("cpu"))
    feats = {
        split: extract_features(
            backbone,
            ds,
            transform,
            n_blocks=4,
            batch_size=64,
            autocast_dtype=autocast,
            dataset_key=f"{cfg.data}|{split}|{len(ds)}|seed{cfg.seed}",
            progress=True,
        )
        for split, ds in (("train", train_set), ("test", test_set))
    }
    probe = train_linear_probe(
        feats["train"], feats["test"], num_classes, LinearProbeConfig(seed=cfg.seed), progress=False
    )
    knn = knn_classify(
        feats["train"].cls[:, -1],
        feats["train"].labels,
        feats["test"].cls[:, -1],
        feats["test"].labels,
        num_classes,
        ks=(10, 20),
    )
    metrics = {
        "model": name,
        "linear_top1": probe.metrics["top1"],
        "linear_top5": probe.metrics["top5"],
        "linear_best_head": probe.best_head,
        "knn_top1": knn["top1"],
        "knn_best_k": knn["best_k"],
        "knn_per_k": knn["per_k"],
        "n_train": len(train_set),
        "n_test": len(test_set),
    }
    save_metrics({**probe.metrics, "protocol": "linear", "best_head": probe.best_head}, out / "linear")
    save_metrics(knn, out / "knn")
    (out / "summary.json").write_text(json.dumps(metrics, indent=2))
    return metrics


FIGURES_RESERVE_S = 15.0  # the figures and the report after the last evaluation (1 s on a 2-core AMX Xeon)


@dataclass(frozen=True)
class StepTiming:
    """What the budget planner measured: seconds per optimisation step (the fastest of the timed warm steps, each with
    its batch's multi-crop transform, as the data loader adds it), seconds to build one variant's objective, and
    the untimed warm-up steps (process-wide kernel set-up that the variants, run in this process, do not pay
    again)."""

    step_s: float
    build_s: float
    samples: tuple[float, ...] = ()
    warmup: tuple[float, ...] = ()
    transform_s: float = 0.0  # median of the timed steps' multi-crop transforms
    compute_s: float = 0.0  # median of the timed steps' forward + backward + optimiser + EMA

    @property
    def setup_s(self) -> float:
        """Per-variant time besides its steps: building the objective, and merging + writing the export (about as
        long again)."""
        return 2 * self.build_s


def plan_steps(cfg: DemoConfig, elapsed_s: float, eval_s: float, step_s: float, setup_s: float = 0.0) -> int:
    """Steps per variant so that the whole demo fits ``budget_minutes``: what is left after the elapsed time, one
    evaluation (timed on the frozen model) and ``setup_s`` (building the objective, writing the export) per variant
    and a reserve for the figures, shared by the variants. Clamped to ``[min_steps, max_steps]``."""
    n = len(cfg.variants)
    left = cfg.budget_minutes * 60.0 - elapsed_s - n * (eval_s + setup_s) - FIGURES_RESERVE_S
    steps = int(left / max(n * step_s, 1e-9))
    return max(cfg.min_steps, min(cfg.max_steps, steps))


def planned_seconds(cfg: DemoConfig, steps: int, elapsed_s: float, eval_s: float, step_s: float,
                    setup_s: float = 0.0) -> float:
    """The demo's predicted wall time with ``steps`` per variant (what :func:`plan_steps` budgets)."""
    n = len(cfg.variants)
    return elapsed_s + n * (eval_s + setup_s + steps * step_s) + FIGURES_RESERVE_S


def measure_step_seconds(cfg: DemoConfig, dataset, timed: int = 4, max_warm: int = 8) -> StepTiming:
    """Time ExPLoRA optimisation steps at the demo's settings: untimed warm-up steps until a step is no more than
    1.2x faster than the one before (at most ``max_warm``), then the fastest of ``timed`` steps, each drawing a new
    batch through the objective's multi-crop transform (which the data-loader worker runs in a real step, on the
    same cores) and running forward, backward, AdamW and the EMA update.

    Why not one or two steps: the first steps of a process set up its CPU kernels (oneDNN/AMX bf16 primitives per
    shape), once per process. Measured on a 2-core Xeon with AMX (bf16): 20.4, 16.4, 6.5 s, then 0.76, 0.69,
    0.82 s; a second objective in the same process ran at 0.7 s from its first step. A fixed short warm-up times
    the set-up, not the step. Why the fastest and not the median: steps keep getting faster after the warm-up as
    the kernel caches fill (timed 0.56-0.65 s, then 0.545 s per step over the real 276-step runs), so the median
    planned 0.63 s and a 10-minute demo ended after 7.8 minutes."""

    pcfg = _pretrain_config(replace(cfg, steps=cfg.steps or cfg.max_steps), "explora")
    t = time.perf_counter()
    objective = build_objective(pcfg, (tuple(dataset.mean), tuple(dataset.std)))
    build_s = time.perf_counter() - t
    transform = objective.batch_transform()
    n = min(len(dataset), cfg.batch_size * (max_warm + timed))
    images = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(n)])
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = build_optimizer([{"params": params}], betas=(0.9, 0.999))  # the engine's: fused AdamW
    warmup: list[float] = []
    samples: list[float] = []
    step = 0
    transform_samples: list[float] = []
    compute_samples: list[float] = []
    while len(samples) < timed:
        t = time.perf_counter()
        start = (step * cfg.batch_size) % max(1, n - cfg.batch_size + 1)
        batch = transform(images[start : start + cfg.batch_size], torch.Generator().manual_seed(cfg.seed + step))
        t_batch = time.perf_counter()
        forward_backward(objective, objective, batch, step, cfg.precision, torch.device("cpu"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.on_optimizer_step(step)
        t_end = time.perf_counter()
        seconds = overlapped_step_seconds(t_batch - t, t_end - t_batch, cfg.num_workers)
        settled = bool(warmup) and seconds * 1.2 >= warmup[-1]  # no longer getting faster
        if samples or settled or len(warmup) >= max_warm:
            samples.append(seconds)
            transform_samples.append(t_batch - t)
            compute_samples.append(t_end - t_batch)
        else:
            warmup.append(seconds)
        step += 1
    return StepTiming(step_s=min(samples), build_s=build_s, samples=tuple(round(x, 3) for x in samples),
                      warmup=tuple(round(x, 3) for x in warmup), transform_s=statistics.median(transform_samples),
                      compute_s=statistics.median(compute_samples))


def overlapped_step_seconds(transform_s: float, compute_s: float, num_workers: int) -> float:
    """Seconds per training step when the multi-crop transform runs in ``num_workers`` data-loader processes
    alongside the step (the engine's loader prefetches): the slower of the two; in the main process, their sum.

    On a fast CPU with small crops the transform is a few percent of the step (2-core AMX Xeon, the demo's
    settings: 0.023 s of 0.68 s); with large images or slow cores it can be the larger of the two."""
    if num_workers <= 0:
        return transform_s + compute_s
    return max(compute_s, transform_s / num_workers)


def run_demo(cfg: DemoConfig) -> Path:
    """Run the whole demo; returns the path of ``report.md``. Finished stages are reused on a rerun."""

    if not cfg.data:
        cfg = replace(cfg, data=default_data())
    cfg = resolve_sizes(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_full = build_dataset(cfg.data, split="train", image_size=cfg.image_size)
    test_full = build_dataset(cfg.data, split="test", image_size=cfg.image_size)
    num_classes = int(train_full.num_classes)
    train_set = _eval_subset(train_full, cfg.n_train_eval, cfg.seed)
    test_set = _eval_subset(test_full, cfg.n_test_eval, cfg.seed + 1)
    timings: dict[str, float] = {}

    def stage(name: str):
        _log.info("demo: %s (%.0fs elapsed)", name, time.perf_counter() - t0)

    results: dict[str, dict[str, Any]] = {}
    params: dict[str, dict[str, Any]] = {}
    stage("frozen backbone: linear probe + kNN")
    frozen = build_backbone(cfg.model, weights=cfg.weights, img_size=cfg.image_size)
    t = time.perf_counter()
    results["frozen"] = _evaluate(
        frozen, "frozen", cfg, train_set, test_set, train_full, num_classes, out / "eval" / "frozen"
    )
    timings["eval_frozen_s"] = time.perf_counter() - t
    params["frozen"] = {"trainable": 0, "total": sum(p.numel() for p in frozen.parameters())}

    plan_path = out / "plan.json"
    if cfg.steps is None:
        if plan_path.is_file():  # a rerun keeps the plan, so interrupted runs resume with the same config
            cfg = replace(cfg, steps=int(json.loads(plan_path.read_text())["steps"]))
        else:
            stage("timing warm pre-training steps to fit the budget")
            timing = measure_step_seconds(cfg, train_full)
            setup_s = timing.setup_s
            elapsed = time.perf_counter() - t0
            eval_s = timings["eval_frozen_s"]
            steps = plan_steps(cfg, elapsed, eval_s, timing.step_s, setup_s)
            plan = {
                "steps": steps,
                "step_seconds": round(timing.step_s, 3),
                "step_samples": list(timing.samples),
                "transform_seconds": round(timing.transform_s, 3),  # per step; overlapped with the step by the loader
                "compute_seconds": round(timing.compute_s, 3),
                "warmup_samples": list(timing.warmup),
                "setup_seconds": round(setup_s, 1),  # per variant: building the objective, writing the export
                "budget_minutes": cfg.budget_minutes,
                "eval_seconds": round(eval_s, 1),
                "planned_seconds": round(planned_seconds(cfg, steps, elapsed, eval_s, timing.step_s, setup_s), 1),
            }
            atomic_write_bytes(plan_path, json.dumps(plan, indent=2).encode())
            cfg = replace(cfg, steps=steps)
            _log.info("demo: %.2f s per step here: %d steps per variant fit %g minutes (planned %.0f s)",
                      timing.step_s, steps, cfg.budget_minutes, plan["planned_seconds"])

    for variant in cfg.variants:
        pcfg = _pretrain_config(cfg, variant)
        run_dir = Path(pcfg.output_dir)
        counted = build_backbone(cfg.model, weights=None, img_size=cfg.image_size)
        apply_preset(counted, VARIANTS[variant].preset, **VARIANTS[variant].overrides)
        report = parameter_report(counted)
        params[variant] = {"trainable": report.paper_count, "total": report.backbone_total, **report.to_dict()}
        if not (run_dir / "summary.json").is_file():
            stage(f"pre-training: {VARIANTS[variant].label}, {cfg.steps} steps")
            t = time.perf_counter()
            run_pretrain(pcfg, resume=True)
            timings[f"pretrain_{variant}_s"] = time.perf_counter() - t
        stage(f"{VARIANTS[variant].label}: linear probe + kNN")
        adapted = build_backbone(
            cfg.model, weights=str(run_dir / "export" / "model.safetensors"), img_size=cfg.image_size
        )
        t = time.perf_counter()
        results[variant] = _evaluate(
            adapted, variant, cfg, train_set, test_set, train_full, num_classes, out / "eval" / variant
        )
        timings[f"eval_{variant}_s"] = time.perf_counter() - t

    segmentation: dict[str, dict[str, Any]] = {}
    if cfg.seg_data:
        stage("segmentation: frozen encoders under a linear head")
        t = time.perf_counter()
        segmentation = _segment_part(cfg, out)
        timings["segmentation_s"] = time.perf_counter() - t

    stage("figures")

    report_path = write_report(cfg, out, results, params, timings, frozen, test_set, train_full, started=t0)
    if segmentation:
        _append_segmentation(report_path, segmentation)
    _log.info("demo: report %s (%.0fs)", report_path.resolve(), timings["total_s"])
    return report_path


def _segment_part(cfg: DemoConfig, out: Path) -> dict[str, dict[str, Any]]:
    """The frozen DinoV2 and every adapted export, frozen, under a linear segmentation head; each run's metrics
    (read back from its ``metrics.json``; a finished run is reused on a rerun)."""
    train = build_dataset(cfg.seg_data, split="train", image_size=cfg.image_size)
    val = build_dataset(cfg.seg_val_data or cfg.seg_data, split="val", image_size=cfg.image_size)
    sources = {"frozen": cfg.weights} | {
        v: str(out / "runs" / v / "export" / "model.safetensors") for v in cfg.variants
    }
    results = {}
    for name, weights in sources.items():
        run_dir = out / "seg" / name
        if not (run_dir / "metrics.json").is_file():
            torch.manual_seed(cfg.seed)
            backbone = build_backbone(cfg.model, weights=weights, img_size=cfg.image_size)
            train_cfg = TrainConfig(steps=cfg.seg_steps, batch_size=cfg.seg_batch_size, seed=cfg.seed,
                                    precision=cfg.precision, num_workers=0, tensorboard=False,
                                    eval_every=cfg.seg_steps, ckpt_every=cfg.seg_steps, log_every=10)
            run_segment(backbone, train, val, run_dir, image_size=cfg.image_size, mode="frozen", head="linear",
                        train_cfg=train_cfg)
        results[name] = load_metrics(run_dir)
    return results


def _append_segmentation(report: Path, results: dict[str, dict[str, Any]]) -> None:
    """A section of ``report.md`` with each encoder's mIoU, pixel accuracy and the spread over chips."""
    labels = {"frozen": "DinoV2 (frozen)", **{k: v.label for k, v in VARIANTS.items()}}
    lines = ["", "## Segmentation (frozen encoder, linear head)", "",
             "| model | mIoU | mIoU over chips (± SE) | pixel acc. | val chips |", "|---|---:|---:|---:|---:|"]
    for name, m in results.items():
        lines.append(f"| {labels.get(name, name)} | {m['miou']:.2f} | {m['miou_chip_mean']:.2f} ± "
                     f"{m['miou_chip_se']:.2f} | {m['pixel_accuracy']:.2f} | {m['num_samples']} |")
    report.write_text(report.read_text() + "\n".join(lines) + "\n")


__all__ = ["DemoConfig", "StepTiming", "VARIANTS", "measure_step_seconds", "overlapped_step_seconds", "plan_steps",
           "planned_seconds", "replace", "run_demo"]
