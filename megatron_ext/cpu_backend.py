"""Megatron-Core on CPU: the interceptions that let 0.16.1 run over gloo without CUDA.

Megatron-Core assumes CUDA at a handful of call sites. `apply()` intercepts exactly those,
once, and only when CUDA is absent; on a GPU machine it does nothing. Every interception is
pinned to the megatron-core version below and has a test in tests/test_cpu_backend.py that
fails when upstream changes (the call site no longer needs it, or its shape changed).

Interceptions (each a named function below, listed in INTERCEPTIONS):
- cuda_device: `torch.cuda.current_device()` -> the CPU device, and a TorchFunctionMode that
  rewrites `device='cuda'` / `device=<int>` / `.cuda()` / `.to('cuda')` to the CPU and drops
  `pin_memory=True` (RoPE's context-parallel slicing pins its index tensor).
- cuda_streams: `torch.cuda.Stream/Event/current_stream/stream/synchronize` -> no-op stand-ins.
- cuda_tensor_type: `param.type()` reports `torch.cuda.FloatTensor` etc. for CPU params (the
  optimizers dispatch on that string).
- cuda_rng: the CUDA RNG used by Megatron's RNG tracker -> a separate CPU `torch.Generator`
  (not the default one: the tracker's `fork()` checks the default CPU state is unchanged).
  Note: ops inside `fork()` still draw from the default CPU generator, so dropout masks in
  tensor-parallel regions are not decorrelated across TP ranks on CPU (Qwen uses no dropout).
- moe_split_sizes: the alltoall dispatcher's split sizes stay CPU tensors that gloo's
  `all_to_all_single` cannot take; `maybe_move_tensor_to_cpu(as_numpy=True)` converts them.
- uneven_collectives: expert-tensor parallelism all-gathers / reduce-scatters token blocks of
  different sizes per rank; gloo's list collectives need equal sizes, so the blocks are
  padded to the largest (gather) or reduced whole and sliced (reduce-scatter).
- eager_fusions: Megatron's `jit_fuser` is `torch.compile`, used by a few functions that run on
  CPU too (the expert-bias update, weighted SwiGLU). Its fusions are written for GPUs; on CPU
  inductor builds C++ for the host's vector ISA with the host compiler at first use, which
  depends on the toolchain (it has failed to build under `ATEN_CPU_CAPABILITY=default`) and
  costs compile time in every process. TorchDynamo is turned off, so they run as the plain
  PyTorch they are written in.

Besides the interceptions, `keep_freed_memory` tunes glibc's allocator for CPU training: tensors
above its mmap threshold (32 MiB at most by default; a [256, 152k] fp32 logits block is 155 MB)
are mapped fresh on every allocation and unmapped on free, so each of them pays a page fault per
4 KiB page on first touch. The threshold (and the trim threshold) are raised so freed blocks are
reused. On a 2-core machine a 155 MB subtract went from ~100 ms to ~40 ms, and 30 steps of the
default debug run from 16.2M to 0.32M page faults and 136 s to 88 s, its resident set from 1.08
to 1.26 GB (flat from step 8 on). Freed memory stays with the process: it holds its peak, not its
current use.

(The MoE router's `te_general_gemm` is undefined wherever Transformer Engine is absent, GPUs
included, so its fix is a patch in megatron_ext/patches.py, applied on every machine.)
"""

from __future__ import annotations

import contextlib
import logging

import torch

from megatron_ext.patches import PINNED_MEGATRON_CORE

log = logging.getLogger(__name__)
_applied = False
_cpu_generator = None


def _is_cuda_device(device) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # Megatron passes torch.cuda.current_device() as a bare index
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CpuDeviceMode(torch.overrides.TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU and reports CUDA type names for CPU tensors."""

    _CPU = torch.device("cpu")
    _TYPE_NAMES = {
        torch.float32: "torch.cuda.FloatTensor",
        torch.float16: "torch.cuda.HalfTensor",
        torch.bfloat16: "torch.cuda.BFloat16Tensor",
    }

    rewrite_devices = False
    cuda_type_names = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.cuda_type_names and func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = self._TYPE_NAMES.get(args[0].dtype)
            if name is not None:
                return name
        if not self.rewrite_devices:
            return func(*args, **kwargs)
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if kwargs.get("pin_memory"):  # pinned host memory exists only with an accelerator
            kwargs["pin_memory"] = False
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = self._CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], self._CPU) + tuple(args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for torch.cuda.Stream / Event: every operation is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def query(self):
        return True

    def record_event(self, *args, **kwargs):
        return _NullStream()


_mode = None


def _device_mode() -> _CpuDeviceMode:
    global _mode
    if _mode is None:
        _mode = _CpuDeviceMode()
        _mode.__enter__()  # stays active for the life of the process
    return _mode


def cuda_device() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.set_device = lambda device: None
    _device_mode().rewrite_devices = True


def cuda_streams() -> None:
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullStream
    torch.cuda.current_stream = lambda *args, **kwargs: _NullStream()
    torch.cuda.default_stream = lambda *args, **kwargs: _NullStream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *args, **kwargs: None


def cuda_tensor_type() -> None:
    _device_mode().cuda_type_names = True


def cuda_rng() -> None:
    global _cpu_generator
    from megatron.core.tensor_parallel import random as mrandom

    _cpu_generator = torch.Generator(device="cpu")

    def get_state(*args, **kwargs):
        return _cpu_generator.get_state()

    def set_state(new_state, *args, **kwargs):
        _cpu_generator.set_state(new_state)

    def manual_seed(seed):
        _cpu_generator.manual_seed(int(seed))

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    torch.cuda.get_rng_state = get_state
    torch.cuda.set_rng_state = set_state
    torch.cuda.manual_seed = manual_seed
    torch.cuda.manual_seed_all = manual_seed


def moe_split_sizes() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    # token_dispatcher imported the name directly
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def uneven_collectives() -> None:
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        blocks = [torch.empty_like(padded) for _ in output_split_sizes]
        torch.distributed.all_gather(blocks, padded.contiguous(), group=group)
        return torch.cat([b[:n] for b, n in zip(blocks, output_split_sizes)])

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        return torch.split(total, list(input_split_sizes), dim=0)[group.rank()].contiguous()

    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim


def eager_fusions() -> None:
    import torch._dynamo

    torch._dynamo.config.disable = True


INTERCEPTIONS = (cuda_device, cuda_streams, cuda_tensor_type, cuda_rng, moe_split_sizes, uneven_collectives,
                 eager_fusions)


def keep_freed_memory() -> bool:
    """Large blocks from glibc's heap, kept on free, instead of fresh mappings per allocation
    (module docstring). True if set; False where the C library has no mallopt (not glibc)."""
    import ctypes

    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold, most = -1, -3, 2**31 - 1  # glibc's mallopt takes a C int
    return bool(mallopt(m_mmap_threshold, most)) and bool(mallopt(m_trim_threshold, most))


def cpu_generator() -> torch.Generator:
    """The generator standing in for the CUDA RNG (None before apply())."""
    return _cpu_generator


def apply() -> bool:
    """Install the interceptions if CUDA is absent. Idempotent. Returns True if applied."""
    global _applied
    if _applied or torch.cuda.is_available():
        return _applied
    import megatron.core

    if megatron.core.__version__ != PINNED_MEGATRON_CORE:
        raise RuntimeError(
            f"the CPU backend is pinned to megatron-core {PINNED_MEGATRON_CORE}, found "
            f"{megatron.core.__version__}; re-check megatron_ext/cpu_backend.py against it"
        )
    for interception in INTERCEPTIONS:
        interception()
    keep_freed_memory()
    _applied = True
    log.info("CPU backend: applied %d interceptions for megatron-core %s", len(INTERCEPTIONS),
             PINNED_MEGATRON_CORE)
    return True
