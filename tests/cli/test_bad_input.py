"""The bad-input table (docs/robustness.md): every case through the CLI exits != 0 with a message that names the
thing and says what was expected, and harms nothing already saved. Plus safe loading and config fuzzing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import simulate_disk_full
from data_fixtures import idx_files, image_folder, truncate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from log_capture import explora_log

from explora.cli.main import main
from explora.core.errors import ConfigError
from explora.engine.checkpoint import CheckpointManager
from explora.recipes.pretrain import load_config

TINY = [
    "model.name=test_dinov2", "model.weights=null", "data.image_size=32", "dinov2.n_prototypes=64",
    "dinov2.hidden_dim=32", "dinov2.bottleneck_dim=16", "dinov2.global_size=32", "dinov2.local_size=16",
    "dinov2.n_local=2", "train.batch_size=4", "train.num_workers=0", "train.log_every=1", "train.tensorboard=false",
    "train.precision=fp32",
]
EVAL = ["--backbone", "test_dinov2", "--image-size", "32", "--batch-size", "4", "--num-workers", "0"]


@pytest.fixture(scope="module")
def m(tmp_path_factory) -> Path:
    """Tiny material: Fashion-MNIST-style IDX, RGB and 13-band folders, an empty folder, foreign checkpoints."""
    import timm

    from explora.models.backbone import build_backbone

    root = tmp_path_factory.mktemp("bad")
    idx_files(root / "fm", n=16)
    image_folder(root / "imgs", per_class=2)
    image_folder(root / "imgs3", classes=("a", "b", "c"), per_class=2)
    image_folder(root / "tifs", suffix=".tif", per_class=2)
    image_folder(root / "corrupt", per_class=2)
    truncate(root / "corrupt" / "cat" / "cat_1.png", keep=0.3)
    (root / "empty").mkdir()
    torch.save(build_backbone("test_dinov2", in_chans=13).state_dict(), root / "bands13.pth")
    wider = timm.create_model("vit_small_patch8_224", img_size=32, embed_dim=96, depth=4, num_heads=3, num_classes=0)
    torch.save(wider.state_dict(), root / "wider.pth")
    (root / "typo.yaml").write_text("train:\n  stpes: 3\n")
    return root


def _pre(m: Path, *extra: str) -> list[str]:
    return ["pretrain", *TINY, "train.steps=2", f"data.spec=fashion_mnist:{m / 'fm'}:rgb=true",
            f"output_dir={m / 'out'}", *extra]


# (case id, argv(m), substrings the one-paragraph message must contain) -- the table of docs/robustness.md
CASES = [
    ("misspelled key", lambda m: ["pretrain", "train.stpes=3"], ["unknown key 'stpes'", "Did you mean 'steps'"]),
    ("misspelled key in file", lambda m: ["pretrain", "--config", str(m / "typo.yaml")],
     ["config.train: unknown key 'stpes'", "'steps'"]),
    ("wrong type", lambda m: ["pretrain", "train.steps=abc"], ["train.steps: got 'abc', expected an integer"]),
    ("out of range", lambda m: ["pretrain", "train.steps=0"], ["train.steps: got 0, expected an integer >= 1"]),
    ("negative lr", lambda m: ["pretrain", "optim.base_lr=-1"], ["optim.base_lr: got -1.0, expected a positive"]),
    ("bad choice", lambda m: ["pretrain", "train.precision=fp16"], ["train.precision: got 'fp16'", "'bf16'"]),
    ("config file missing", lambda m: ["pretrain", "--config", str(m / "nope.yaml")],
     ["nope.yaml does not exist"]),
    ("data root missing", lambda m: _pre(m, f"data.spec=imagefolder:{m / 'nope'}"),
     ["nope: folder not found", "expected one sub-folder per class"]),
    ("weights file missing", lambda m: _pre(m, f"model.weights={m / 'nope.pth'}"),
     ["nope.pth: checkpoint file not found"]),
    ("other architecture", lambda m: _pre(m, f"model.weights={m / 'wider.pth'}"),
     ["wider.pth: checkpoint is another architecture (embed_dim=96", "expected test_dinov2 (embed_dim=64"]),
    ("13-band weights into RGB", lambda m: _pre(m, f"model.weights={m / 'bands13.pth'}"),
     ["bands13.pth: checkpoint has in_chans=13", "expected test_dinov2", "in_chans=3"]),
    ("band count mismatch", lambda m: _pre(m, f"data.spec=imagefolder:{m / 'tifs'}"),
     ["has 13 band(s) but the model takes model.in_chans=3"]),
    ("grayscale into RGB", lambda m: _pre(m, f"data.spec=fashion_mnist:{m / 'fm'}"),
     ["has 1 band(s)", "':rgb=true'"]),
    ("empty folder", lambda m: _pre(m, f"data.spec=folder:{m / 'empty'}"), ["empty: no samples found; expected"]),
    ("empty class folder", lambda m: _pre(m, f"data.spec=imagefolder:{m / 'empty'}"),
     ["empty: no images in class sub-folders"]),
    ("corrupt image", lambda m: _pre(m, f"data.spec=imagefolder:{m / 'corrupt'}"),
     ["cat_1.png: unreadable or truncated image", "expected a RGB image"]),
    ("bad dataset spec", lambda m: _pre(m, "data.spec=imagefoldr:/x"), ["unknown dataset 'imagefoldr'",
                                                                        "did you mean 'imagefolder'"]),
    ("bad preset", lambda m: _pre(m, "adapt.preset=D-[L]-r46"), ["'D-[L]-r46'", "'D-[L]-r64'"]),
    ("finetune: missing data", lambda m: ["finetune", *EVAL, "--data", f"imagefolder:{m / 'nope'}",
                                          "--out", str(m / "ft")], ["nope: folder not found"]),
    ("finetune: labels out of range", lambda m: ["finetune", *EVAL, "--data", f"imagefolder:{m / 'imgs'}",
                                                 "--val-data", f"imagefolder:{m / 'imgs3'}", "--out", str(m / "ft")],
     ["has 3 classes but --data", "has 2", "labels 2..2 are out of range"]),
    ("finetune: unlabeled data", lambda m: ["finetune", *EVAL, "--data", f"folder:{m / 'imgs'}",
                                            "--out", str(m / "ft")], ["num_classes=0; expected >= 2"]),
    ("linprobe: bad spec", lambda m: ["linprobe", *EVAL, "--data", "nocolon", "--out", str(m / "lp")],
     ["dataset spec 'nocolon': expected 'name:path"]),
    ("linprobe: labels out of range", lambda m: ["linprobe", *EVAL, "--data", f"imagefolder:{m / 'imgs'}",
                                                 "--val-data", f"imagefolder:{m / 'imgs3'}", "--out", str(m / "lp")],
     ["has 3 classes but --data"]),
    ("knn: weights missing", lambda m: ["knn", *EVAL, "--weights", str(m / "nope.pth"), "--data",
                                        f"imagefolder:{m / 'imgs'}", "--out", str(m / "knn")],
     ["nope.pth: checkpoint file not found"]),
    ("export: weights missing", lambda m: ["export", "--model", "test_dinov2", "--weights", str(m / "nope.pth"),
                                           "--out", str(m / "exp")], ["nope.pth: checkpoint file not found"]),
    ("export: other architecture", lambda m: ["export", "--model", "test_dinov2", "--weights", str(m / "wider.pth"),
                                              "--out", str(m / "exp")], ["checkpoint is another architecture"]),
    ("params: unknown model", lambda m: ["params", "--model", "vit_nonexistent"], ["'vit_nonexistent'"]),
    ("params: spec file missing", lambda m: ["params", "--model", "test_dinov2", "--spec", str(m / "nope.yaml")],
     ["--spec", "nope.yaml: file not found; expected an ExploraSpec YAML"]),
    ("data check: missing root", lambda m: ["data", "check", f"imagefolder:{m / 'nope'}"],
     ["nope: folder not found"]),
    ("data check: bad spec", lambda m: ["data", "check", "bogus:/x"], ["unknown dataset 'bogus'"]),
    ("analyze: missing data", lambda m: ["analyze", "--model", "test_dinov2", "--data", f"imagefolder:{m / 'nope'}",
                                         "--out", str(m / "an")], ["nope: folder not found"]),
    ("analyze: other architecture", lambda m: ["analyze", "--model", "test_dinov2", "--weights", str(m / "wider.pth"),
                                               "--data", f"imagefolder:{m / 'imgs'}", "--image-size", "32",
                                               "--out", str(m / "an")], ["checkpoint is another architecture"]),
]


@pytest.mark.parametrize("argv, expected", [pytest.param(a, e, id=i) for i, a, e in CASES])
def test_bad_input_is_a_named_error(m, argv, expected, capsys):
    rc = main(argv(m))
    err = " ".join(capsys.readouterr().err.split())
    assert rc != 0, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    assert not (m / "out" / "checkpoints").exists()


@pytest.fixture(scope="module")
def done(m, tmp_path_factory) -> Path:
    """One finished 2-step run (checkpoints at steps 1 and 2, export); tests work on copies of it."""
    run = tmp_path_factory.mktemp("done") / "run"
    assert main(_pre(m, f"output_dir={run}", "train.ckpt_every=1", "train.keep_last=2")) == 0
    return run


def _copy(done: Path, tmp_path: Path) -> Path:
    shutil.copytree(done, tmp_path / "run")
    return tmp_path / "run"


def test_no_space_left_while_saving_keeps_the_previous_checkpoint(m, tmp_path, monkeypatch, capsys):
    # config.yaml, run_metadata.json and the first checkpoint (.pt + manifest) fit
    simulate_disk_full(monkeypatch, writes_that_fit=4)
    run = tmp_path / "run"
    assert main(_pre(m, f"output_dir={run}", "train.ckpt_every=1", "train.keep_last=1")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "ckpt-00000002.pt: No space left on device" in err and "Nothing already saved was changed" in err
    monkeypatch.undo()
    ckpts = CheckpointManager(run / "checkpoints")
    assert ckpts.verify(1) is None and not ckpts.path_for(2).exists()
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert not (run / "summary.json").exists()


def test_resume_with_a_different_config_is_refused_and_harms_nothing(m, done, tmp_path, capsys):
    run = _copy(done, tmp_path)
    same = [f"output_dir={run}", "train.ckpt_every=1", "train.keep_last=2"]
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main([*_pre(m, *same, "train.seed=1", "adapt.lora_rank=4"), "--resume"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "adapt.lora_rank: saved 64, now 4" in err and "train.seed: saved 0, now 1" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # logging/checkpoint settings may differ
    assert main([*_pre(m, *same, "train.log_every=2", "train.keep_last=3"), "--resume"]) == 0


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(m, done, tmp_path, capsys):
    from safetensors.torch import load_file

    run = _copy(done, tmp_path)
    last = run / "checkpoints" / "ckpt-00000002.pt"
    last.write_bytes(last.read_bytes()[:100])  # truncated: the manifest no longer matches
    (run / "summary.json").unlink()
    with pytest.warns(UserWarning, match="ckpt-00000002.pt: size 100 bytes"), explora_log() as messages:
        assert main([*_pre(m, f"output_dir={run}", "train.ckpt_every=1", "train.keep_last=2"), "--resume"]) == 0
    assert any("ckpt-00000001.pt (step 1)" in msg for msg in messages)
    a, b = load_file(done / "export" / "model.safetensors"), load_file(run / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Evil:
    """Unpickling this runs ``touch <marker>``: a stand-in for arbitrary code in a downloaded checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_as_weights_is_refused_unexecuted(m, tmp_path, capsys):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save({"model": Evil(marker)}, path)
    assert main(_pre(m, f"output_dir={tmp_path / 'run'}", f"model.weights={path}")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "evil.pth: the checkpoint contains a pickled posix.system object" in err and "refuses" in err
    assert not marker.exists()


def test_malicious_pickle_as_resume_checkpoint_is_refused_unexecuted(m, done, tmp_path, capsys):
    run, marker = _copy(done, tmp_path), tmp_path / "pwned"
    for p in (run / "checkpoints").iterdir():
        p.unlink()
    path = run / "checkpoints" / "ckpt-00000001.pt"
    torch.save({"step": 1, "objective": Evil(marker)}, path)
    data = path.read_bytes()  # an intact manifest: the file is "complete", only its content is hostile
    manifest = {"step": 1, "file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    path.with_suffix(".json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="ckpt-00000001.pt: cannot be read"):
        assert main([*_pre(m, f"output_dir={run}", "train.ckpt_every=1", "train.keep_last=2"), "--resume"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "none of the checkpoints" in err and "Nothing was changed" in err
    assert not marker.exists() and path.read_bytes() == data


def test_configs_never_execute_code(m, tmp_path, capsys):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f'output_dir: !!python/object/apply:os.system ["touch {marker}"]\n')
    assert main(["pretrain", "--config", str(cfg)]) == 2
    assert "evil.yaml is not valid YAML" in " ".join(capsys.readouterr().err.split())
    assert main(["pretrain", f'output_dir=!!python/object/apply:os.system ["touch {marker}"]', "train.steps=x"]) == 2
    capsys.readouterr()
    assert not marker.exists()


KEYS = ["train.steps", "train.batch_size", "train.precision", "optim.base_lr", "optim.betas", "model.name",
        "model.in_chans", "adapt.unfrozen_blocks", "adapt.lora_rank", "data.on_error", "objective", "dinov2.n_local",
        "mae.mask_ratio", "export_formats", "train", "output_dir", "train.stpes", "a..b", ""]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.lists(
    st.one_of(st.text(max_size=30), st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.text(max_size=20))),
    max_size=4))
def test_fuzz_overrides_only_raise_config_error(overrides):
    with contextlib.suppress(ConfigError):
        load_config(None, overrides)
