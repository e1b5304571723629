from __future__ import annotations

import pytest
import torch
from conftest import simulate_disk_full

from explora.core.errors import CheckpointError
from explora.engine.checkpoint import CheckpointManager


def _state(v: float) -> dict:
    return {"step": int(v), "w": torch.full((4,), v)}


def test_save_keeps_last_k_and_loads_newest(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    for s in (1, 2, 3):
        m.save(_state(s), s)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    assert torch.equal(m.load_latest()["w"], torch.full((4,), 3.0))


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest"])
def test_damaged_latest_falls_back_to_previous(tmp_path, damage):
    m = CheckpointManager(tmp_path, keep_last=3)
    m.save(_state(1), 1)
    p = m.save(_state(2), 2)
    data = p.read_bytes()
    if damage == "truncate":
        p.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        p.write_bytes(data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))
    else:
        p.with_suffix(".json").unlink()
    with pytest.warns(UserWarning, match="ckpt-00000002"):
        state = m.load_latest()
    assert state["step"] == 1


def test_no_space_left_is_a_clear_error_and_harms_nothing(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path, keep_last=2)
    m.save(_state(1), 1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    simulate_disk_full(monkeypatch)
    with pytest.raises(CheckpointError, match="No space left on device.*Nothing already saved was changed"):
        m.save(_state(2), 2)
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before
    assert m.load_latest()["step"] == 1
