"""Data-parallel wrapping of the SSL model: gradient sync (ddp), FSDP2 sharding (fsdp), compile.

`train.distributed=ddp`: every process holds the full model; `GradientSync` all-reduces the
student's gradients in flat buckets from per-parameter post-accumulate-grad hooks, so communication
overlaps with backward. We do not wrap in DistributedDataParallel because DDP only synchronises
gradients of forwards that go through the wrapper's own `__call__`, while the SSL step calls the
student's backbone and heads separately; per-parameter hooks are exact for any call pattern.

`train.distributed=fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) shards every transformer
block, then each backbone and head, of the student and the teacher, with the dtypes of
`compute_precision.<student|teacher>.<part>.mixed_precision` and `sharding_strategy`
(FULL_SHARD frees gathered parameters after forward, SHARD_GRAD_OP keeps them until backward,
NO_SHARD leaves the part unsharded and its gradients go through `GradientSync` like ddp's).
The teacher EMA then runs on matching local shards.
"""

import logging
import os
import shutil
import time
from collections.abc import Iterable
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from dinov2.utils.config import ConfigError
from dinov2.utils.distributed import get_global_size
from dinov2.utils.dtypes import dtype_from_name

logger = logging.getLogger("dinov2")


def broadcast_module_state_(module: nn.Module, src: int = 0) -> None:
    """Copy `module`'s parameters and buffers from rank `src` to every process (before sharding)."""
    if get_global_size() == 1:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)


class GradientSync:
    """Average the gradients of `params` over all processes while backward is still running (ddp mode).

    The mechanism is DDP's, on PyTorch's public hooks: parameters are grouped into flat buckets of
    about `bucket_mb` MiB, in reverse registration order (roughly the order in which backward produces
    their gradients: heads, last block, ..., patch embedding). `Tensor.register_post_accumulate_grad_hook`
    runs once per backward for each parameter, after autograd has summed the contributions of every use
    of it into `.grad`; the hook copies that gradient into its bucket, and a complete bucket starts an
    asynchronous all_reduce at once, so communication overlaps with the rest of backward. Buckets
    start strictly in index order (a complete bucket waits for the ones before it), so every process
    issues the same collectives in the same order whatever order its hooks fire in.

    Being per parameter, this is exact for any call pattern: the SSL step calls the backbone once on
    the packed crop list and each head separately, which `DistributedDataParallel` (it only syncs
    forwards through its own `__call__`) cannot follow.

    Usage, once per step::

        sync = GradientSync(model.student.parameters())
        loss.backward()      # buckets are all-reduced as their gradients appear
        sync.finish()        # before clipping: wait, divide by the world size, write back to .grad
        ...
        sync.close()         # when training ends: remove the hooks

    Frozen parameters (`requires_grad=False`, e.g. the backbone during head warm-up) do not hold a
    bucket back. `finish()` also reduces buckets whose hooks did not all fire (a parameter without a
    gradient this step counts as zero; a bucket with no gradient at all is skipped); every process
    must agree on which parameters got a gradient, which holds because all run the same step. A
    second backward before `finish()` raises: gradient accumulation would otherwise be averaged only
    in part.
    """

    def __init__(self, params: Iterable[nn.Parameter], bucket_mb: float = 25.0):
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        self.world = get_global_size()
        self.buckets: list[_Bucket] = []
        self._hooks: list = []
        self.waited_seconds = 0.0  # time finish() spent waiting on collectives (exposed communication)
        if self.world == 1:
            return
        bucket_bytes = int(bucket_mb * 2**20)
        current: list[nn.Parameter] = []
        for p in reversed([p for p in params]):
            full = current and sum(q.numel() * q.element_size() for q in current) >= bucket_bytes
            mismatch = current and (p.dtype != current[0].dtype or p.device != current[0].device)
            if full or mismatch:
                self.buckets.append(_Bucket(current))
                current = []
            current.append(p)
        if current:
            self.buckets.append(_Bucket(current))
        self._next = 0  # index of the next bucket to start
        for index, bucket in enumerate(self.buckets):
            for slot, p in enumerate(bucket.params):
                # Frozen parameters get their hook too, for when they are unfrozen (head warm-up);
                # torch only registers it on a tensor that requires grad at that moment.
                frozen = not p.requires_grad
                p.requires_grad_(True)
                self._hooks.append(p.register_post_accumulate_grad_hook(partial(self._on_grad, index, slot)))
                p.requires_grad_(not frozen)

    def close(self) -> None:
        """Remove the hooks (the parameters' gradients are then no longer synchronised)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @torch.no_grad()
    def _on_grad(self, index: int, slot: int, param: nn.Parameter) -> None:
        bucket = self.buckets[index]
        if bucket.handle is not None or slot in bucket.ready:
            raise RuntimeError(
                "GradientSync: a second backward before finish(); call finish() after every backward"
            )
        bucket.put(slot, param.grad)
        while self._next < len(self.buckets) and self.buckets[self._next].complete():
            self._start(self._next)

    def _start(self, index: int) -> None:
        bucket = self.buckets[index]
        bucket.zero_missing()
        bucket.handle = dist.all_reduce(bucket.flat, async_op=True)
        self._next = index + 1

    @torch.no_grad()
    def finish(self) -> None:
        """Wait for every bucket's all_reduce and put the averaged gradients back into `.grad`."""
        if self.world == 1:
            return
        for index in range(self._next, len(self.buckets)):
            if self.buckets[index].ready:
                self._start(index)
            self._next = index + 1
        t0 = time.perf_counter()
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
        self.waited_seconds = time.perf_counter() - t0
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.flat.div_(self.world)
                bucket.write_back()
            bucket.reset()
        self._next = 0


class _Bucket:
    """Parameters whose gradients travel in one flat all_reduce."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.offsets = [0]
        for p in params:
            self.offsets.append(self.offsets[-1] + p.numel())
        self.flat = torch.zeros(self.offsets[-1], dtype=params[0].dtype, device=params[0].device)
        self.ready: set[int] = set()
        self.handle = None

    def view(self, slot: int) -> torch.Tensor:
        return self.flat[self.offsets[slot] : self.offsets[slot + 1]]

    def put(self, slot: int, grad: torch.Tensor) -> None:
        self.view(slot).copy_(grad.reshape(-1))
        self.ready.add(slot)

    def complete(self) -> bool:
        """Every parameter that can get a gradient this step has one (frozen ones get none)."""
        return all(slot in self.ready or not p.requires_grad for slot, p in enumerate(self.params))

    def zero_missing(self) -> None:
        for slot in range(len(self.params)):
            if slot not in self.ready:
                self.view(slot).zero_()

    def write_back(self) -> None:
        for slot in self.ready:
            grad = self.params[slot].grad
            grad.copy_(self.view(slot).view_as(grad))

    def reset(self) -> None:
        self.ready = set()
        self.handle = None


def _blocks(backbone: nn.Module) -> list[nn.Module]:
    """Transformer blocks of a DinoVisionTransformer (inside BlockChunks when block_chunks > 0)."""
    blocks = []
    for child in backbone.blocks:
        inner = (
            [m for m in child if not isinstance(m, nn.Identity)]
            if isinstance(child, nn.ModuleList)
            else [child]
        )
        blocks.extend(inner)
    return blocks


def cast_float_buffers_(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast `module`'s floating-point buffers to `dtype` in place (`mixed_precision.buffer_dtype`).

    FSDP2 leaves buffers unsharded and uncast. DINOv2's backbones and heads hold none; the loss
    centers are buffers of the loss modules, outside every part, and stay float32.
    """
    for sub in module.modules():
        for name, buf in sub._buffers.items():
            if buf is not None and buf.is_floating_point():
                sub._buffers[name] = buf.to(dtype)


def apply_fsdp2(model: nn.Module, precision_cfg) -> list[nn.Parameter]:
    """Shard `model.student` and `model.teacher` (ModuleDicts of backbone/heads) with FSDP2 in place.

    Args:
        model: the SSLMetaArch, with student/teacher ModuleDicts.
        precision_cfg: cfg.compute_precision (sharding_strategy and mixed_precision per part).

    Returns:
        the parameters of the student parts left unsharded (NO_SHARD), whose gradients the caller
        must synchronise (`GradientSync`); FSDP2 reduces the sharded parts' gradients itself.
    """
    unsharded: list[nn.Parameter] = []
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    for who in ("student", "teacher"):
        for name, part in getattr(model, who).items():
            key = name if name in precision_cfg[who] else "dino_head"
            part_cfg = precision_cfg[who][key]
            if part_cfg.sharding_strategy == "NO_SHARD":
                if who == "student":
                    unsharded += list(part.parameters())
                continue
            mp = part_cfg.mixed_precision
            where = f"compute_precision.{who}.{key}.mixed_precision"
            cast_float_buffers_(part, dtype_from_name(mp.buffer_dtype, f"{where}.buffer_dtype"))
            policy = MixedPrecisionPolicy(
                param_dtype=dtype_from_name(mp.param_dtype, f"{where}.param_dtype"),
                reduce_dtype=dtype_from_name(mp.reduce_dtype, f"{where}.reduce_dtype"),
                output_dtype=None, cast_forward_inputs=True,
            )  # fmt: skip
            # The teacher never runs backward, which is where FSDP2 reshards a part that kept its
            # gathered weights after forward (SHARD_GRAD_OP): it must free them right after forward.
            reshard = part_cfg.sharding_strategy == "FULL_SHARD" or who == "teacher"
            if hasattr(part, "blocks"):
                for block in _blocks(part):
                    fully_shard(block, mp_policy=policy, reshard_after_forward=reshard)
            fully_shard(part, mp_policy=policy, reshard_after_forward=reshard)
            # The SSL step and the monitors call these methods directly, not through forward().
            for method in ("forward_features", "forward_features_list", "get_intermediate_layers"):
                if hasattr(part, method):
                    register_fsdp_forward_method(part, method)
    logger.info("FSDP2: student and teacher sharded over %d processes", get_global_size())
    return unsharded


def check_compile_supported(device_type: str) -> None:
    """Raise ConfigError (naming `train.compile`) when torch.compile's default backend cannot run here.

    Inductor generates Triton kernels on a GPU and C++ on the CPU: without Triton, or without a C++
    compiler, the first compiled forward would fail minutes into the run instead of at start-up.
    """
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError(
                "train.compile=true needs Triton on a GPU (pip install triton), or set train.compile=false"
            )
    elif device_type == "cpu":
        compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
        if not any(c and shutil.which(c) for c in compilers):
            raise ConfigError(
                "train.compile=true on the CPU needs a C++ compiler (g++ or clang++, or $CXX) on PATH, "
                "or set train.compile=false"
            )


def compile_backbones(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each transformer block of the student and teacher backbones, in place.

    Call it before `apply_fsdp2` (as torchtitan does): each block is compiled as it is, and FSDP2
    then registers its all-gather / reshard hooks around the block's call; Dynamo runs those hooks
    eagerly (`torch._dynamo.config.skip_fsdp_hooks`), so they never enter a graph. Blocks compile
    in place (`nn.Module.compile`), so parameter names and checkpoint keys are unchanged, and the
    blocks of one backbone, having one structure, share compiled graphs: the first step compiles a
    graph per crop shape and grad mode (student globals, student locals, teacher), later steps reuse
    them. `backend` is torch.compile's (tests use "aot_eager" to skip code generation).
    """
    for who in ("student", "teacher"):
        backbone = getattr(model, who)["backbone"]
        for block in _blocks(backbone):
            block.compile(backend=backend)
    logger.info("torch.compile (%s) enabled for the student and teacher backbone blocks", backend)
