"""`explora push`: an export (or a run's) goes to the Hub through huggingface_hub, private by default; the client is
a local fake here (no network), and every failure is a message that says what to do."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from explora.cli.main import main
from explora.core.errors import ConfigError
from explora.models.backbone import build_backbone
from explora.models.export import export_backbone
from explora.recipes import push as push_module
from explora.recipes.push import find_export, push_export


class FakeHub:
    """The three HfApi calls push makes; uploads land in a local folder per repository."""

    def __init__(self, root: Path, fail: Exception | None = None) -> None:
        self.root, self.fail, self.repos = root, fail, {}

    def whoami(self) -> dict:
        if self.fail is not None:
            raise self.fail
        return {"name": "me"}

    def create_repo(self, repo_id: str, *, private: bool, exist_ok: bool) -> str:
        self.repos.setdefault(repo_id, {"private": private})
        return f"https://hub.local/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, commit_message, revision, ignore_patterns):
        dest = self.root / repo_id
        shutil.copytree(folder_path, dest, ignore=shutil.ignore_patterns(*ignore_patterns), dirs_exist_ok=True)
        self.repos[repo_id].update(message=commit_message, revision=revision)
        return type("CommitInfo", (), {"commit_url": f"https://hub.local/{repo_id}/commit/1"})()


@pytest.fixture
def run(tmp_path) -> Path:
    run = tmp_path / "run"
    export_backbone(build_backbone("test_dinov2"), run / "export", "vit_small_patch14_dinov2",
                    formats=("safetensors",))
    (run / "export" / "leftover.tmp").write_text("partial write")
    return run


def test_push_uploads_the_export_private_by_default(run, tmp_path, monkeypatch, capsys) -> None:
    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(push_module, "hub_api", lambda: hub)
    assert main(["push", str(run), "--repo", "me/explora-test"]) == 0
    assert hub.repos["me/explora-test"]["private"] is True
    uploaded = sorted(p.name for p in (tmp_path / "hub" / "me" / "explora-test").iterdir())
    assert uploaded == ["README.md", "config.json", "model.json", "model.safetensors"]  # card written first, no .tmp
    assert "https://hub.local/me/explora-test/commit/1" in capsys.readouterr().out
    probe = tmp_path / "linprobe"
    probe.mkdir()
    (probe / "metrics.json").write_text('{"protocol": "linear_probe", "top1": 64.5, "top5": 90.0}')
    assert main(["push", str(run / "export"), "--repo", "me/public", "--no-private", "--message", "v2",
                 "--evals", str(probe)]) == 0
    assert hub.repos["me/public"] == {"private": False, "message": "v2", "revision": None}
    assert "| linear_probe | 64.50 | 90.00 |" in (tmp_path / "hub" / "me" / "public" / "README.md").read_text()


def test_push_errors_name_the_fix(run, tmp_path, monkeypatch, capsys) -> None:
    from huggingface_hub.errors import LocalTokenNotFoundError, OfflineModeIsEnabled

    for err, words in ((LocalTokenNotFoundError("no token"), "hf auth login"),
                       (OfflineModeIsEnabled("offline"), "HF_HUB_OFFLINE"),
                       (ConnectionError("Connection refused"), "cannot reach the Hugging Face Hub")):
        with pytest.raises(ConfigError, match=words):
            push_export(run, "me/x", api=FakeHub(tmp_path / "hub", fail=err))
    with pytest.raises(ConfigError, match="user/name"):
        push_export(run, "not a repo", api=FakeHub(tmp_path / "hub"))
    with pytest.raises(ConfigError, match="no explora export"):
        find_export(tmp_path)
    assert main(["push", str(tmp_path), "--repo", "me/x"]) != 0 and "no explora export" in capsys.readouterr().err


def test_real_client_without_a_token_says_log_in(run, tmp_path, monkeypatch) -> None:
    """The real huggingface_hub client, no token anywhere: refused before any network call."""
    pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    with pytest.raises(ConfigError, match="hf auth login|HF_HUB_OFFLINE"):
        push_export(run, "me/x")
