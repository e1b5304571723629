"""The process helpers in one process: identities and plain tensors, so library code may call them anywhere."""

from __future__ import annotations

import pytest
import torch

from explora.core import distributed as D


def test_single_process_helpers_are_identities():
    assert (D.is_dist(), D.rank(), D.world_size(), D.is_main()) == (False, 0, 1, True)
    t = torch.tensor([1.0, 3.0])
    for op in ("sum", "mean", "max"):
        assert D.all_reduce_(t, op) is t and t.tolist() == [1.0, 3.0]
    with pytest.raises(ValueError, match="op 'min'"):
        D.all_reduce_(t, "min")
    assert D.all_gather_objects({"a": 1}) == [{"a": 1}]
    D.barrier()


def test_shard_helpers_leave_plain_tensors_alone():
    a, b = torch.zeros(2), torch.ones(3)
    assert D.local_shards([a, b])[0] is a and D.full_tensor(b) is b


def test_engine_parallel_reexports_the_same_helpers():
    from explora.engine import parallel

    assert parallel.rank is D.rank and parallel.all_reduce_ is D.all_reduce_ and parallel.full_tensor is D.full_tensor
