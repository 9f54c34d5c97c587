"""Training step time with `train.compile=true` (each backbone block compiled) against eager, one run.

Two copies of the same model (same seed, same collated batch) take turns: the eager step is the
baseline, the compiled step the candidate. The first compiled step is timed on its own (that is the
compile time a run pays once); both are then timed interleaved after warm-up, so load from other
processes hits both alike. The step is the training loop's own `train_step` (schedules, forward and
backward, loss check, clipping, fused AdamW, EMA). Also printed: the first step's losses of both,
whose agreement the tests assert more strictly (tests/train/test_compile.py).

    python benchmarks/bench_compile.py --config configs/pbc_cpu_recipe.yaml --threads 2
    python benchmarks/bench_compile.py --config train/vitl_cellsim_register --device cuda \
        train.batch_size_per_gpu=32
"""

import argparse
import statistics
import time

import torch
from common import build_bench_config, host_summary, make_batch, synchronize, time_interleaved

from dinov2.train.distributed_wrap import check_compile_supported, compile_backbones
from dinov2.train.schedules import build_schedulers
from dinov2.train.step import StepContext, build_optimizer, train_step
from dinov2.train.train import build_model
from dinov2.utils.config import apply_scaling_rules_to_cfg


def make_step(cfg, device: torch.device, batch: dict, compiled: bool, backend: str):
    """A closure running one training step of a fresh model (seed 0), and the model."""
    torch.manual_seed(0)
    model = build_model(cfg, device)
    if compiled:
        compile_backbones(model, backend=backend)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    schedules = build_schedulers(cfg, world_size=1)
    it = [0]

    def step():
        # Stay on the first schedule entries: the time of a step does not depend on them.
        out = train_step(model, optimizer, scaler, StepContext(), batch, schedules, it[0] % 2, cfg)
        it[0] += 1
        return out

    return step


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", default="configs/pbc_cpu_recipe.yaml", help="config file or packaged name"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--image-size", type=int, default=128, help="side of the random source images")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.backend == "inductor":
        check_compile_supported(device.type)
    cfg = build_bench_config(args.config, args.opts)
    apply_scaling_rules_to_cfg(cfg, world_size=1)
    batch = make_batch(cfg, args.image_size, seed=0)
    bs = cfg.train.batch_size_per_gpu
    print(host_summary())
    print(f"config {args.config} on {device} ({torch.get_num_threads()} CPU threads), batch {bs}, "
          f"crops {cfg.crops.global_crops_size}/{cfg.crops.local_crops_size} "
          f"x 2+{cfg.crops.local_crops_number}, "
          f"backend {args.backend}")  # fmt: skip

    eager = make_step(cfg, device, batch, compiled=False, backend=args.backend)
    compiled = make_step(cfg, device, batch, compiled=True, backend=args.backend)
    first_eager = eager().loss_values()
    synchronize(device)
    t0 = time.perf_counter()
    first_compiled = compiled().loss_values()
    synchronize(device)
    compile_s = time.perf_counter() - t0
    times = time_interleaved({"eager": eager, "compiled": compiled}, args.iters, device, warmup=args.warmup)
    eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
    loss_gap = abs(first_compiled["total_loss"] - first_eager["total_loss"])
    print(f"first compiled step (compiles): {compile_s:8.1f} s")
    print(f"eager step:    {eager_s * 1000:8.1f} ms  {bs / eager_s:8.1f} images/s  (baseline)")
    print(f"compiled step: {compiled_s * 1000:8.1f} ms  {bs / compiled_s:8.1f} images/s")
    print(f"compiled / eager step time: {compiled_s / eager_s:.2f}x; compile pays for itself after "
          f"{compile_s / max(eager_s - compiled_s, 1e-9):.0f} steps" if compiled_s < eager_s else
          f"compiled / eager step time: {compiled_s / eager_s:.2f}x (no gain here)")  # fmt: skip
    print(f"first-step total loss: eager {first_eager['total_loss']:.6f}, compiled "
          f"{first_compiled['total_loss']:.6f} (|diff| {loss_gap:.1e})")  # fmt: skip
    return {"eager_step_seconds": eager_s, "compiled_step_seconds": compiled_s, "compile_seconds": compile_s,
            "first_step_total_loss_gap": loss_gap}  # fmt: skip


if __name__ == "__main__":
    main()
