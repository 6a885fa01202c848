"""Layout arithmetic (parallel/mesh.py's Layout, the ZeRO-1 chunking of parallel/grad_reducer.py)
and the rank-spawning helper's failure report: no model, nothing shared with the four-rank run
of tests/test_parallel.py.
"""

from __future__ import annotations

import pytest
import torch

from launch.ranks import RankError, run_ranks
from parallel import comm
from parallel.grad_reducer import chunk_range
from parallel.mesh import Layout


def _rank_one_fails(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("boom on rank 1")
    comm.barrier()  # rank 0 waits for a peer that is gone: the helper must not hang


def test_layout_coords_and_groups():
    layout = Layout(pp=2, dp=4, ep=2)
    assert layout.world == 8 and layout.edp == 2 and layout.problems(world=8) == []
    # rank = pp_rank * dp + dp_rank; ep blocks of 2 inside each stage's dp ranks.
    assert layout.coords(0) == (0, 0, 0, 0)
    assert layout.coords(5) == (1, 1, 1, 0)
    assert layout.coords(7) == (1, 3, 1, 1)
    assert layout.group_of("dp", 5) == [4, 5, 6, 7]
    assert layout.group_of("ep", 5) == [4, 5]
    assert layout.group_of("edp", 5) == [5, 7]
    assert layout.group_of("pp", 5) == [1, 5]
    assert layout.groups("ep") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.groups("edp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.groups("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.groups("dp") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for kind in ("pp", "dp", "ep", "edp"):  # every kind partitions the world
        assert sorted(r for g in layout.groups(kind) for r in g) == list(range(8))


@pytest.mark.parametrize("layout, world, needle", [
    (Layout(2, 4, 3), 8, "parallel.ep=3 does not divide parallel.dp=4"),
    (Layout(2, 4, 2), 6, "world size 6 != parallel.pp * parallel.dp"),
    (Layout(0, 4, 1), 4, "parallel.pp=0"),
])
def test_layout_problems_are_one_line_each(layout, world, needle):
    found = layout.problems(world=world)
    assert len(found) == 1 and "\n" not in found[0] and needle in found[0]
    assert Layout(1, 4, 2).problems(world=4, n_experts=5)[0].startswith("model.n_routed_experts=5")


def test_chunk_matches_torch_chunk():
    for size in range(10):
        for n in range(1, 5):
            lengths = [c.shape[0] for c in torch.arange(size).chunk(n)] if size else []
            lengths += [0] * (n - len(lengths))
            assert [chunk_range(size, n, i)[1] for i in range(n)] == lengths
            starts = [min(sum(lengths[:i]), size) for i in range(n)]
            assert [chunk_range(size, n, i)[0] for i in range(n)] == starts


def test_spawn_helper_reports_a_failing_rank():
    with pytest.raises(RankError) as info:
        run_ranks(_rank_one_fails, 2, timeout_s=60)
    assert "--- rank 1 ---" in str(info.value) and "ValueError: boom on rank 1" in str(info.value)
    # stopped soon after the failure (its peer's own error, or "stopped after another rank
    # failed"), not at the deadline
    assert "no result within" not in str(info.value)
