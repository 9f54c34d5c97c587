"""Data-parallel SSL step on 2 gloo processes (CPU): exposed gradient communication, old vs overlapped.

Each of the 2 processes trains two copies of the same ViT-S-sized student (384 wide, 12 blocks, 6
heads; `--small`: 192 wide, 6 blocks) with the full training step (dinov2.train.step.train_step:
teacher, student, DINO + iBOT + KoLeo, backward, gradient sync, clip, fused AdamW, EMA), alternating
step by step so that both see the same load on a shared machine:

- post-backward: today's previous method, kept here as the baseline. After backward has finished,
  the gradients are averaged in flat 25 MiB buckets (concatenate, all_reduce, divide, copy back).
- overlapped: dinov2.train.distributed_wrap.GradientSync. Per-parameter post-accumulate-grad hooks
  start each bucket's asynchronous all_reduce as soon as its gradients exist, during backward; after
  backward only the wait for the last buckets and the copy back remain.

Exposed communication is the time the step spends in the gradient sync after backward returned
(the whole averaging for post-backward; the wait plus copy-back for overlapped). Step time is the
whole train_step. Medians over --iters steps per mode, after --warmup steps.

Host-device synchronisations per step are counted on rank 0 during one more step (not a log step)
by patching the ways a tensor's value reaches Python (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`,
`float()`, `int()`, `bool()`); on a GPU each of these waits for the device.

    python benchmarks/bench_distributed_step.py            # ViT-S-sized student
    python benchmarks/bench_distributed_step.py --small    # quicker
"""

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import build_bench_config, make_batch

from dinov2.train.distributed_wrap import GradientSync
from dinov2.train.schedules import build_schedulers
from dinov2.train.step import StepContext, build_optimizer, train_step
from dinov2.train.train import build_model

READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


class PostBackwardAverager:
    """The previous ddp gradient averaging: flat buckets all-reduced after backward (the baseline)."""

    def __init__(self, params, bucket_mb: float = 25.0):
        self.params = list(params)
        self.bucket_bytes = int(bucket_mb * 2**20)

    @torch.no_grad()
    def finish(self) -> None:
        world = dist.get_world_size()
        bucket, size = [], 0
        for p in self.params:
            if p.grad is None:
                continue
            if bucket and size + p.grad.numel() * p.grad.element_size() > self.bucket_bytes:
                self._reduce(bucket, world)
                bucket, size = [], 0
            bucket.append(p.grad)
            size += p.grad.numel() * p.grad.element_size()
        if bucket:
            self._reduce(bucket, world)

    @staticmethod
    def _reduce(grads, world: int) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


class TimedSync:
    """Wraps a gradient sync and records how long each finish() took (the exposed communication)."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds: list[float] = []

    def finish(self) -> None:
        t0 = time.perf_counter()
        self.inner.finish()
        self.seconds.append(time.perf_counter() - t0)


def _config(small: bool, batch: int):
    width, depth, heads = (192, 6, 3) if small else (384, 12, 6)
    opts = [f"student.embed_dim={width}", f"student.depth={depth}", f"student.num_heads={heads}",
            f"train.batch_size_per_gpu={batch}", "optim.lr=1e-4"]  # fmt: skip
    return build_bench_config("train/vit_tiny_cpu", opts)


def count_reads(step) -> int:
    """Calls that bring a tensor's value to Python while `step()` runs."""
    counts = {"n": 0}
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(real):
        def read(self, *args, **kwargs):
            counts["n"] += 1
            return real(self, *args, **kwargs)

        return read

    for name, real in saved.items():
        setattr(torch.Tensor, name, counting(real))
    try:
        step()
    finally:
        for name, real in saved.items():
            setattr(torch.Tensor, name, real)
    return counts["n"]


def _worker(rank: int, world: int, args, store: str, result_path: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        cfg = _config(args.small, args.batch)
        schedules = build_schedulers(cfg, world_size=world)
        batch = make_batch(cfg, image_size=128, seed=100 + rank)
        device = torch.device("cpu")
        runs = {}
        for mode in ("post-backward", "overlapped"):
            torch.manual_seed(0)
            model = build_model(cfg, device)
            params = list(model.student.parameters())
            sync = TimedSync(GradientSync(params) if mode == "overlapped" else PostBackwardAverager(params))
            runs[mode] = dict(model=model, optimizer=build_optimizer(model, cfg.optim), sync=sync, steps=[])
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        for i in range(args.warmup + args.iters):
            for run in runs.values():
                ctx = StepContext(grad_sync=run["sync"])
                t0 = time.perf_counter()
                train_step(run["model"], run["optimizer"], scaler, ctx, batch, schedules, i, cfg)
                run["steps"].append(time.perf_counter() - t0)
            if rank == 0:
                print(f"step {i + 1}/{args.warmup + args.iters}", flush=True)
        run = runs["overlapped"]
        it = args.warmup + args.iters
        ctx = StepContext(grad_sync=run["sync"])
        n_reads = count_reads(
            lambda: train_step(run["model"], run["optimizer"], scaler, ctx, batch, schedules, it, cfg)
        )
        if rank == 0:
            n_params = sum(p.numel() for p in runs["overlapped"]["model"].student.parameters())
            out = {"n_params": n_params, "reads_per_step": n_reads, "buckets": len(run["sync"].inner.buckets)}
            for mode, r in runs.items():
                out[mode] = {
                    "step": r["steps"][args.warmup :],
                    "exposed": r["sync"].seconds[args.warmup : it],
                }
            torch.save(out, result_path)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="192 wide, 6 blocks instead of ViT-S")
    parser.add_argument("--batch", type=int, default=4, help="images per process")
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        result_path = f"{tmp}/result.pt"
        mp.spawn(_worker, args=(2, args, f"{tmp}/store", result_path), nprocs=2, join=True)
        out = torch.load(result_path)
    load_after = os.getloadavg()
    print(f"2 gloo processes x {args.threads} thread(s), student {out['n_params'] / 1e6:.1f}M parameters "
          f"({out['buckets']} buckets of <= 25 MiB), {args.batch} images per process, medians of "
          f"{args.iters} steps; load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after")  # fmt: skip
    result = {"reads_per_step": out["reads_per_step"], "load_average": (load_before[0], load_after[0])}
    for mode in ("post-backward", "overlapped"):
        step = statistics.median(out[mode]["step"])
        exposed = statistics.median(out[mode]["exposed"])
        result[mode] = {"step_seconds": step, "exposed_seconds": exposed}
        print(f"{mode:>14}: step {step * 1000:8.1f} ms   exposed gradient communication "
              f"{exposed * 1000:7.1f} ms ({100 * exposed / step:4.1f} % of the step)")  # fmt: skip
    ratio = result["overlapped"]["exposed_seconds"] / result["post-backward"]["exposed_seconds"]
    result["exposed_ratio"] = ratio
    print(f"exposed communication, overlapped / post-backward: {ratio:.2f}")
    print(f"host-device synchronisations per step (not a log step): {out['reads_per_step']}")
    return result


if __name__ == "__main__":
    main()
