"""One `Layout` for the parallel arithmetic: its sizes for a table of layouts (worked by hand),
the smallest world and the groups cross-checked against Megatron-Core's own
`parallel_state.initialize_model_parallel`, and the former call sites agreeing with it."""

from __future__ import annotations

import json
import re

import pytest
import torch

from megatron_ext import offline
from megatron_ext.cli import load_config
from megatron_ext.config import Config, ConfigError, ParallelConfig, TrainConfig, validate
from megatron_ext.layout import Layout, min_world_size
from tests.gloo import run_on_ranks


def _cfg(mbs=1, gbs=8, **parallel) -> Config:
    return Config(parallel=ParallelConfig(**parallel), train=TrainConfig(micro_batch_size=mbs, global_batch_size=gbs))


# (parallel sizes, world, micro batch, global batch) -> dp, dp_cp, edp, micro-batches per step, smallest world
TABLE = [
    (dict(), 1, 2, 8, (1, 1, 1, 4, 1)),
    (dict(tp=2, pp=2), 8, 1, 16, (2, 2, 2, 8, 4)),
    (dict(tp=2, cp=2), 8, 1, 8, (2, 4, 4, 4, 4)),
    (dict(tp=2, cp=2, ep=4, etp=1), 8, 2, 16, (2, 4, 2, 4, 4)),
    (dict(pp=2, ep=8), 16, 1, 64, (8, 8, 1, 8, 16)),
    (dict(ep=2, etp=2), 4, 1, 8, (4, 4, 1, 2, 4)),
    (dict(tp=2, ep=3, etp=1), 6, 1, 6, (3, 3, 2, 2, 6)),
    (dict(pp=2, vpp=2), 4, 1, 8, (2, 2, 2, 4, 2)),
    (dict(etp=2), 2, 1, 4, (2, 2, 1, 2, 2)),
    (dict(tp=2, pp=2, cp=2, ep=2), 16, 2, 32, (2, 4, 2, 8, 8)),
]


@pytest.mark.parametrize("parallel,world,mbs,gbs,want", TABLE, ids=lambda v: str(v))
def test_layout_sizes(parallel, world, mbs, gbs, want):
    lay = Layout.of(_cfg(mbs, gbs, **parallel), world)
    assert (lay.dp, lay.dp_cp, lay.edp, lay.microbatches, lay.min_world) == want
    assert Layout.of(_cfg(mbs, gbs, **parallel)).world == want[4] == min_world_size(ParallelConfig(**parallel))
    assert lay.world_errors() == [] and lay.batch_errors() == []
    assert lay.vpp == (parallel.get("vpp") or 1) and lay.etp == parallel.get("etp", parallel.get("tp", 1))


def test_layout_is_a_frozen_value():
    lay = Layout.of(_cfg(tp=2), 4)
    with pytest.raises(AttributeError):
        lay.dp = 3
    assert lay == Layout.of(_cfg(tp=2), 4) and hash(lay) == hash(Layout.of(_cfg(tp=2), 4))


# ---------------------------------------------------------------- against Megatron-Core

MEGATRON_CASES = [parallel for parallel, *_ in TABLE]
_GETTERS = {"tp": "get_tensor_model_parallel_group", "cp": "get_context_parallel_group",
            "dp": "get_data_parallel_group", "pp": "get_pipeline_model_parallel_group",
            "ep": "get_expert_model_parallel_group", "etp": "get_expert_tensor_parallel_group",
            "edp": "get_expert_data_parallel_group"}


def _megatron_groups(parallel: dict, world: int, rank: int):
    """Each group's ranks as Megatron-Core builds them for `rank` of `world`, or its refusal.

    torch's fake process group stands in for `world` processes: Megatron's own checks and group
    construction run unchanged; no collective is ever called."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=parallel.get("tp", 1), pipeline_model_parallel_size=parallel.get("pp", 1),
            virtual_pipeline_model_parallel_size=parallel.get("vpp"), context_parallel_size=parallel.get("cp", 1),
            expert_model_parallel_size=parallel.get("ep", 1), expert_tensor_parallel_size=parallel.get("etp"),
            create_gloo_process_groups=False)
        groups = {k: dist.get_process_group_ranks(getattr(ps, g)()) for k, g in _GETTERS.items()}
        groups["dp_cp"] = dist.get_process_group_ranks(ps.get_data_parallel_group(with_context_parallel=True))
        return groups
    except (RuntimeError, AssertionError) as e:
        return f"refused: {e}"
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def _ask_megatron(rank, world_size, cases):
    """For every layout: Megatron's answer for each world up to twice the smallest (rank 0),
    and every rank's groups at the smallest world."""
    out = []
    for parallel in cases:
        smallest = min_world_size(ParallelConfig(**parallel))
        answers = {w: _megatron_groups(parallel, w, 0) for w in range(1, 2 * smallest + 1)}
        out.append((answers, [_megatron_groups(parallel, smallest, r) for r in range(smallest)]))
    return out


@pytest.fixture(scope="module")
def megatron():
    (result,) = run_on_ranks(_ask_megatron, 1, MEGATRON_CASES)
    return result


@pytest.mark.parametrize("index", range(len(MEGATRON_CASES)), ids=lambda i: str(MEGATRON_CASES[i]))
def test_world_sizes_megatron_accepts(megatron, index):
    """Megatron-Core accepts a world exactly where the Layout finds no fault, the smallest one
    first; its DP, DP x CP and expert-DP sizes equal the Layout's."""
    parallel, (answers, _) = MEGATRON_CASES[index], megatron[index]
    accepted = [w for w, a in answers.items() if not isinstance(a, str)]
    assert accepted[0] == min_world_size(ParallelConfig(**parallel))
    for world, answer in answers.items():
        lay = Layout.of(_cfg(**parallel), world)
        assert (lay.world_errors() == []) == (not isinstance(answer, str)), (world, answer, lay.world_errors())
        if not isinstance(answer, str):
            assert (len(answer["dp"]), len(answer["dp_cp"]), len(answer["edp"])) == (lay.dp, lay.dp_cp, lay.edp)


@pytest.mark.parametrize("index", range(len(MEGATRON_CASES)), ids=lambda i: str(MEGATRON_CASES[i]))
def test_rank_groups_are_megatrons(megatron, index):
    parallel, (_, per_rank) = MEGATRON_CASES[index], megatron[index]
    groups = Layout.of(_cfg(**parallel)).rank_groups()
    assert set(groups) == set(per_rank[0])
    for rank, theirs in enumerate(per_rank):
        mine = {kind: next(g for g in groups[kind] if rank in g) for kind in groups}
        assert mine == theirs, rank


# ---------------------------------------------------------------- validation messages


@pytest.mark.parametrize("overrides,world,message", [
    (["parallel.tp=2", "parallel.cp=2"], 6, "world size 6 is not divisible by parallel.tp*pp*cp = 2*1*2 = 4"),
    (["model=qwen3_moe_debug", "parallel.ep=4"], 2, "world size 2 is not divisible by parallel.ep*etp*pp = 4*1*1"),
    (["parallel.etp=2"], 1, "world size 1 is not divisible by parallel.ep*etp*pp = 1*2*1"),
    (["parallel.etp=0"], 1, "parallel.etp=0 must be >= 1"),
    (["train.global_batch_size=6", "train.micro_batch_size=2"], 2,
     "train.global_batch_size=6 is not divisible by train.micro_batch_size*dp = 2*2"),
    (["parallel.pp=2", "parallel.vpp=2", "train.global_batch_size=6", "train.micro_batch_size=1"], 4,
     "needs the number of microbatches (3) to be a multiple of parallel.pp=2"),
])
def test_validation_reports_the_layout_errors(overrides, world, message):
    with pytest.raises(ConfigError) as e:
        validate(load_config(overrides), world, check_device=False)
    assert message in str(e.value)


def test_layout_needs_no_process_group():
    import torch.distributed as dist

    Layout.of(load_config(["parallel.tp=2"]), 4).world_errors()
    assert not dist.is_initialized()


# ---------------------------------------------------------------- the call sites agree


def test_estimator_launcher_and_tools_agree(capsys):
    """The memory estimator's JSON and the Slurm dry run print the Layout's numbers for the
    same CP=2, EP=4 layout on one 8-GPU node; the offline tools ask for its smallest world."""
    from slurm import launch
    from tools import estimate_memory

    overrides = ["model=qwen3_moe_debug", "parallel.tp=2", "parallel.sp=true", "parallel.cp=2", "parallel.ep=4",
                 "parallel.etp=1", "train.micro_batch_size=2", "train.global_batch_size=16"]
    lay = Layout.of(load_config(overrides), 8)
    assert (lay.dp, lay.edp, lay.microbatches) == (2, 2, 4)

    assert estimate_memory.main([*overrides, "--world-size", "8", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["microbatches"] == lay.microbatches and est["layout"]["dp"] == lay.dp
    assert est["layout"]["edp"] == lay.edp and est["layout"]["dp_cp"] == lay.dp_cp

    assert launch.main(["--dry-run", "--nodes", "1", *overrides], env={}) == 0
    out = capsys.readouterr().out
    assert f"micro {lay.micro_batch_size} x DP {lay.dp} x {lay.microbatches} micro-batches per step" in out
    assert re.search(rf"CP=2 DP={lay.dp} SP=on \| experts: EP=4 ETP=1 expert-DP={lay.edp}", out)

    assert estimate_memory.main([*overrides, "--json"]) == 0  # no --world-size: the smallest
    assert json.loads(capsys.readouterr().out)["layout"]["world"] == lay.min_world == 4
    moe = load_config(["model=qwen3_moe_debug"]).model
    cfg = offline.layout_config(moe, torch.float32, tp=2, pp=2, ep=2, etp=2)
    assert offline.world_size(cfg) == Layout.of(cfg).world == 8


def test_launcher_eval_replicas_are_megatrons_dp_ranks(megatron):
    """With PP=2 on 2 nodes x 2 ranks, Megatron's order puts both replicas' first stages on node 0
    (its DP groups are ranks {0, 1} and {2, 3}): each node holds replicas 0 and 1."""
    from slurm import launch

    cfg = Config(parallel=ParallelConfig(pp=2))
    cfg.eval.tasks = ["math_synth"]
    alloc = launch.Allocation(nodes=2, tasks_per_node=2, gpus_per_node=2, hosts=None, job_name="eval")
    lines = launch.eval_lines(cfg, alloc)
    assert "TP=1 PP=2 | 2 data-parallel replica(s)" in lines[1]
    assert lines[-2:] == ["node 0: ranks 0-1 | replica 0-1", "node 1: ranks 2-3 | replica 0-1"]
    answers, _ = megatron[MEGATRON_CASES.index(dict(pp=2, vpp=2))]
    assert (answers[4]["dp"], answers[4]["pp"]) == ([0, 1], [0, 2])  # rank 0's groups on 4 ranks
