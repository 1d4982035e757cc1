"""Each CPU-backend interception is still needed by megatron-core and still sufficient.

For every interception, a fresh process installs all the others, runs one training step and
must fail at the upstream call site the interception exists for (matched by its error
message). Then the interception is installed and the same step must train. If upstream stops
needing an interception, or the call site changes shape, the first half fails and points here.
"""

import math
from pathlib import Path

import pytest

from tests.gloo import run_on_ranks

REPO = Path(__file__).resolve().parent.parent

TINY = ["train.steps=1", "train.global_batch_size=2", "train.micro_batch_size=1", "data.seq_length=32"]

CASES = [
    # (interception, overrides, ranks, message of the upstream failure without it)
    ("cuda_device", [], 1, "Torch not compiled with CUDA enabled"),
    ("cuda_rng", [], 1, "Torch not compiled with CUDA enabled"),
    ("cuda_tensor_type", ["parallel.distributed_optimizer=true"], 1,
     "Wrapped parameters must be one of torch.cuda.FloatTensor"),
    ("cuda_streams", ["model=qwen3_moe_debug"], 1, "torch.cuda.Stream requires CUDA support"),
    ("moe_split_sizes", ["model=qwen3_moe_debug", "parallel.ep=2"], 2,
     "all_to_all_single(): incompatible function arguments"),
    ("uneven_collectives", ["model=qwen3_moe_debug", "parallel.tp=2", "parallel.sp=true", "parallel.ep=2",
                            "parallel.etp=2"], 4, "ProcessGroupGloo::allgather: invalid tensor size"),
    # Not a failure everywhere: without it Megatron's jit_fuser compiles its fused kernels with
    # torch.compile, so inductor builds C++ with the host compiler at first use; that build has
    # failed on some CPU kernel paths (CppCompileError) and depends on the toolchain. The case
    # checks that the interception keeps the fusions eager (nothing compiled) and still trains.
    ("eager_fusions", ["model=qwen3_moe_debug", "moe.expert_bias=true", "moe.load_balancing=none"], 1,
     "compiled with inductor"),
]


def _without_then_with(rank, world_size, skip, overrides):
    from megatron_ext import cpu_backend
    from megatron_ext.cli import load_config
    from megatron_ext.loop import train
    from megatron_ext.pretrain import PretrainStage

    by_name = {f.__name__: f for f in cpu_backend.INTERCEPTIONS}
    for name, interception in by_name.items():
        if name != skip:
            interception()
    cpu_backend._applied = True  # keep init_parallel from installing the skipped one
    cfg = load_config(TINY + overrides)
    from torch._dynamo.utils import counters

    try:
        train(cfg, PretrainStage())
        error = None
    except Exception as e:  # the upstream failure this interception exists for
        error = f"{type(e).__name__}: {e}"
    graphs = counters["stats"]["unique_graphs"]
    if error is None and graphs:
        error = f"{graphs} graph(s) compiled with inductor"
    by_name[skip]()
    counters.clear()
    history = train(cfg, PretrainStage()).history
    if counters["stats"]["unique_graphs"]:
        raise AssertionError(f"'{skip}' installed, yet torch.compile still compiled graphs")
    return error, history[0]["loss"]


def test_interception_table_is_complete():
    from megatron_ext import cpu_backend

    assert sorted(f.__name__ for f in cpu_backend.INTERCEPTIONS) == sorted(c[0] for c in CASES)


@pytest.mark.parametrize("skip,overrides,ranks,message", CASES, ids=[c[0] for c in CASES])
def test_interception_needed_and_sufficient(skip, overrides, ranks, message, monkeypatch):
    for error, loss in run_on_ranks(_without_then_with, ranks, skip, overrides):
        assert error is not None, f"megatron-core no longer needs the '{skip}' interception"
        assert message in error, f"'{skip}': the upstream call site changed: {error}"
        assert math.isfinite(loss) and loss > 0


def test_apply_is_a_no_op_with_cuda(monkeypatch):
    import torch

    from megatron_ext import cpu_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu_backend, "_applied", False)
    assert cpu_backend.apply() is False
    assert cpu_backend.cpu_generator() is None


def test_apply_refuses_other_megatron_versions(monkeypatch):
    import megatron.core

    from megatron_ext import cpu_backend

    monkeypatch.setattr(cpu_backend, "_applied", False)
    monkeypatch.setattr(megatron.core, "__version__", "0.17.0")
    with pytest.raises(RuntimeError, match="pinned to megatron-core 0.16.1, found 0.17.0"):
        cpu_backend.apply()


_FAULTS = """
import ctypes, resource, sys
from megatron_ext import cpu_backend
if sys.argv[1] == "keep":
    assert cpu_backend.keep_freed_memory()
libc, size, faults = ctypes.CDLL(None), 64 << 20, []
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
for _ in range(4):  # a fresh 64 MiB block, touched, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[1:]))
"""


def test_large_freed_blocks_are_reused_not_mapped_again():
    """keep_freed_memory: by default every 64 MiB block is a fresh mapping (a page fault per
    4 KiB page it touches); with it the freed block is reused."""
    import subprocess
    import sys

    from megatron_ext import cpu_backend

    if not cpu_backend.keep_freed_memory():
        pytest.skip("the C library has no mallopt (not glibc)")
    faults = {how: int(subprocess.run([sys.executable, "-c", _FAULTS, how], check=True, capture_output=True,
                                      text=True, cwd=str(REPO)).stdout) for how in ("default", "keep")}
    pages = 3 * (64 << 20) // 4096
    assert faults["default"] > pages // 2, faults
    assert faults["keep"] < pages // 20, faults
