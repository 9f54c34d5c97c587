"""Data-parallel wrapping of the SSL model: gradient averaging (ddp), FSDP2 sharding (fsdp), compile.

`train.distributed=ddp`: every process holds the full model; after each backward the student's
gradients are averaged over processes in flat buckets. We average explicitly instead of wrapping in
DistributedDataParallel because DDP only synchronises gradients of forwards that go through the
wrapper's own `__call__`, while the SSL step calls the student's backbone and heads separately (and
some of them several times per step); an explicit bucketed all-reduce is exact for any call pattern.

`train.distributed=fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) shards every transformer
block, then each backbone and head, of the student and the teacher, with the dtypes of
`compute_precision.<student|teacher>.<part>.mixed_precision` and `sharding_strategy`
(FULL_SHARD frees gathered parameters after forward, SHARD_GRAD_OP keeps them until backward,
NO_SHARD leaves the part unsharded). The teacher EMA then runs on matching local shards.
"""

import logging
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger("dinov2")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def broadcast_module_state_(module: nn.Module, src: int = 0) -> None:
    """Copy `module`'s parameters and buffers from rank `src` to every process (before sharding)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)


class GradientAverager:
    """Average the gradients of `params` over all processes, in flat buckets of about `bucket_mb` MiB.

    Call after backward and before clipping. Parameters without a gradient (frozen, or unused this
    step) are skipped; every process must agree on which ones those are, which holds because all
    processes run the same step.
    """

    def __init__(self, params: Iterable[nn.Parameter], bucket_mb: float = 25.0):
        self.params = [p for p in params]
        self.bucket_bytes = int(bucket_mb * 2**20)

    @torch.no_grad()
    def __call__(self) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        world = dist.get_world_size()
        bucket: list[torch.Tensor] = []
        size = 0
        for p in self.params:
            if p.grad is None:
                continue
            nbytes = p.grad.numel() * p.grad.element_size()
            mismatch = bucket and (p.grad.dtype != bucket[0].dtype or p.grad.device != bucket[0].device)
            if bucket and (size + nbytes > self.bucket_bytes or mismatch):
                self._reduce(bucket, world)
                bucket, size = [], 0
            bucket.append(p.grad)
            size += p.grad.numel() * p.grad.element_size()
        if bucket:
            self._reduce(bucket, world)

    @staticmethod
    def _reduce(grads: list[torch.Tensor], world: int) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


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


def apply_fsdp2(model: nn.Module, precision_cfg) -> None:
    """Shard `model.student` and `model.teacher` (ModuleDicts of backbone/heads) with FSDP2 in place.

    Args:
        model: the SSLMetaArch, with student/teacher ModuleDicts.
        precision_cfg: cfg.compute_precision (sharding_strategy and mixed_precision per part).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    for who in ("student", "teacher"):
        for name, part in getattr(model, who).items():
            part_cfg = precision_cfg[who][name if name in precision_cfg[who] else "dino_head"]
            if part_cfg.sharding_strategy == "NO_SHARD":
                continue
            mp = part_cfg.mixed_precision
            policy = MixedPrecisionPolicy(
                param_dtype=DTYPES[mp.param_dtype], reduce_dtype=DTYPES[mp.reduce_dtype],
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
    logger.info("FSDP2: student and teacher sharded over %d processes", dist.get_world_size())


def compile_backbones(model: nn.Module) -> None:
    """torch.compile each backbone block in place (state-dict keys stay unchanged)."""
    for who in ("student", "teacher"):
        backbone = getattr(model, who)["backbone"]
        for block in _blocks(backbone):
            block.compile()
    logger.info("torch.compile enabled for the student and teacher backbone blocks")
