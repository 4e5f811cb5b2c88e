"""Run megatron-core on machines without CUDA (CI, laptops, the CPU demo).

megatron-core assumes a GPU throughout: `torch.cuda.current_device()` as a device argument,
literal "cuda" devices and `.cuda()`, CUDA RNG state for its tensor-parallel RNG tracker (entered
on every forward even with dropout 0), streams / events / synchronize around communication, and
`tensor.type() == "torch.cuda.FloatTensor"` checks in grad clipping and the distributed optimizer.
This module is the one place that redirects those to the CPU:

* device: a TorchFunctionMode maps every CUDA device argument (`device=0`, "cuda", `.cuda()`,
  `.to("cuda")`) to the CPU, and reports CPU float tensors with their CUDA type string;
* RNG: the CUDA RNG calls (torch.cuda's and megatron's own state helpers) read and write the
  CPU generator, so the tracker's `fork()` still swaps states the way it does on a GPU;
* streams, events, synchronize, memory statistics: no-ops.

`enable()` is called by `finevit.parallel.init_distributed` only when `torch.cuda.is_available()`
is False; it is idempotent and `torch.cuda.is_available()` keeps answering False, so code that
chooses between GPU and CPU paths still sees the truth.
"""

import contextlib
import importlib

import torch
from torch.overrides import TorchFunctionMode

_enabled = False


def _to_cpu(device):
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaOnCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if func is torch.Tensor.to and len(args) > 1:
            # .to(0) / .to("cuda") name a device positionally; .to(tensor) / .to(dtype) do not.
            args = (args[0], _to_cpu(args[1]), *args[2:])
        if "device" in kwargs:
            kwargs["device"] = _to_cpu(kwargs["device"])
        return func(*args, **kwargs)


class _Stream:
    """Stands in for torch.cuda.Stream: work on the CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _Event()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Event:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _returning(value):
    # A distinct function per patched name: torch._dynamo indexes torch.cuda's functions by
    # identity and rejects one object standing for two names.
    def fn(*args, **kwargs):
        return value

    return fn


def enable() -> None:
    """Redirect megatron-core's CUDA calls to the CPU for the rest of this process."""
    global _enabled
    if _enabled:
        return
    if torch.cuda.is_available():
        raise RuntimeError("the CPU backend is for machines without CUDA, but CUDA is available")
    importlib.import_module("torch._dynamo")  # builds its torch.cuda rule tables before we patch

    cuda = torch.cuda
    patches = {
        # A device, not an index: megatron writes `device=torch.cuda.current_device()`, and the
        # function mode below is not active inside autograd's backward.
        "current_device": _returning(torch.device("cpu")),
        "set_device": _returning(None),
        "synchronize": _returning(None),
        "empty_cache": _returning(None),
        "Stream": _Stream,
        "Event": _Event,
        "current_stream": lambda *a, **k: _Stream(),
        "default_stream": lambda *a, **k: _Stream(),
        "stream": lambda s=None: contextlib.nullcontext(s),
        "get_rng_state": lambda device=None: torch.get_rng_state(),
        "set_rng_state": lambda state, device=None: torch.set_rng_state(state),
        "manual_seed": lambda seed: torch.default_generator.manual_seed(seed),
        # torch.manual_seed itself calls this after seeding the CPU generator.
        "manual_seed_all": _returning(None),
        "memory_allocated": _returning(0),
        "max_memory_allocated": _returning(0),
        "memory_reserved": _returning(0),
        "max_memory_reserved": _returning(0),
        "reset_peak_memory_stats": _returning(None),
    }
    for name, value in patches.items():
        setattr(cuda, name, value)
    for name in ("get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all"):
        setattr(cuda.random, name, patches[name])
    # megatron's RNG tracker reads and writes generator state through its own helpers (the
    # setter queues a lazy CUDA call that would never run here): point them at the CPU generator.
    from megatron.core.tensor_parallel import random as megatron_random

    megatron_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.nvtx.range_push = _returning(None)
    cuda.nvtx.range_pop = _returning(None)
    # Entered once and kept for the life of the process: megatron creates CUDA tensors from
    # module constructors, optimizer steps and communication helpers alike.
    _CudaOnCpu().__enter__()
    _enabled = True


def enabled() -> bool:
    return _enabled
