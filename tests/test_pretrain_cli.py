"""`explora pretrain` end to end on the tiny architecture: train, checkpoint, export, resume, bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from explora.cli import main
from explora.engine.pretrain import build_objective, load_config
from explora.errors import ConfigError

TINY = [
    "model.name=test_dinov2",
    "model.weights=null",
    "data.image_size=32",
    "dinov2.n_prototypes=64",
    "dinov2.hidden_dim=32",
    "dinov2.bottleneck_dim=16",
    "dinov2.global_size=32",
    "dinov2.local_size=16",
    "dinov2.n_local=2",
    "train.batch_size=8",
    "train.num_workers=0",
    "train.log_every=1",
    "train.tensorboard=false",
    "train.precision=fp32",
]


def _err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def _curves(run: Path) -> list[dict[str, str]]:
    """Every logged value except throughput (wall-clock dependent)."""
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "images_per_s"} for row in csv.DictReader(f)]


def _args(idx_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", *TINY, f"data.spec=fashion_mnist:{idx_dir}:rgb=true", f"output_dir={out}", *extra]


def test_pretrain_trains_exports_and_resumes_exactly(idx_dir, tmp_path):
    ref = tmp_path / "ref"
    assert main(_args(idx_dir, ref, "train.steps=6", "train.ckpt_every=3")) == 0
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["steps"] == 6 and set(summary["exports"]) >= {"safetensors", "encoder", "teacher"}
    assert (ref / "config.yaml").is_file() and (ref / "metrics.csv").is_file()

    # Same run, cut at step 3 (as if killed right after its checkpoint), then resumed to step 6.
    run = tmp_path / "run"
    assert main(_args(idx_dir, run, "train.steps=6", "train.ckpt_every=3")) == 0
    for p in (run / "checkpoints").glob("ckpt-00000006.*"):
        p.unlink()
    (run / "summary.json").unlink()
    assert main(_args(idx_dir, run, "train.steps=6", "train.ckpt_every=3", "--resume")) == 0
    a = load_file(ref / "export" / "model.safetensors")
    b = load_file(run / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _curves(ref) == _curves(run)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(idx_dir, tmp_path):
    """A real process, killed with SIGKILL while training (possibly inside a checkpoint write).

    All three runs are fresh processes, so no state left in the test process by other tests (thread count, attention
    kernels) can make the reference differ from the resumed run.
    """
    ref, run = tmp_path / "ref", tmp_path / "run"
    steps = ["train.steps=12", "train.ckpt_every=2", "train.keep_last=1"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))

    def explora(out: Path, *extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "explora", *_args(idx_dir, out, *steps), *extra]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    assert explora(ref).wait() == 0
    proc = explora(run)
    deadline = time.time() + 120
    while time.time() < deadline and not list((run / "checkpoints").glob("ckpt-0000000[4-9].json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists(), "the run finished before it could be killed"
    assert explora(run, "--resume").wait() == 0
    a = load_file(ref / "export" / "model.safetensors")
    b = load_file(run / "export" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_exit_nonzero_with_a_named_message(idx_dir, tmp_path, capsys):
    assert main(["pretrain", "trian.steps=3"]) == 2
    assert "unknown key 'trian'" in _err(capsys)
    assert main(["pretrain", *TINY, "data.spec=fashion_mnist:/nonexistent/dir", f"output_dir={tmp_path}"]) == 2
    assert "/nonexistent/dir" in _err(capsys)
    # grayscale data into an RGB model
    assert main(["pretrain", *TINY, f"data.spec=fashion_mnist:{idx_dir}", f"output_dir={tmp_path / 'g'}"]) == 2
    assert "has 1 band(s) but the model takes model.in_chans=3" in _err(capsys)
    assert (
        main(
            [
                "pretrain",
                *TINY,
                f"data.spec=fashion_mnist:{idx_dir}:rgb=true",
                "adapt.preset=D-[L]-r46",
                f"output_dir={tmp_path / 'p'}",
            ]
        )
        == 2
    )
    assert "D-[L]-r64" in _err(capsys)


def test_compiled_blocks_train_like_eager(idx_dir, tmp_path):
    """model.compile=true: every block compiled in place; same losses as eager, same export keys and weights."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    # no KoLeo: these near-duplicate images put CLS tokens ~1e-10 apart, where -log(distance) and its gradient turn
    # the fused kernels' rounding into percent-level differences (test_distributed.py does the same)
    common = ("train.steps=2", "dinov2.koleo_loss_weight=0")
    assert main(_args(idx_dir, eager, *common)) == 0
    assert main(_args(idx_dir, compiled, *common, "model.compile=true")) == 0
    for a, b in zip(_curves(eager), _curves(compiled), strict=True):
        a, b = ({k: float(v) for k, v in row.items() if k != "koleo"} for row in (a, b))
        assert b == pytest.approx(a, rel=1e-4)
    wa = load_file(eager / "export" / "model.safetensors")
    wb = load_file(compiled / "export" / "model.safetensors")
    assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    with pytest.raises(ConfigError, match="model.compile"):
        build_objective(load_config(None, [*TINY, "model.compile=true", "train.strategy=fsdp2"]))
