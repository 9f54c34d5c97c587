"""Throughput and peak memory of one full DINOv2 training step for a config, on CPU or one GPU.

A full step is what the training loop runs per iteration: teacher forward on the global crops,
student forward on global (masked) + local crops, DINO + iBOT + KoLeo losses, backward, per-part
gradient clipping, AdamW step and the EMA teacher update. One collated batch (built once with the
real multi-crop augmentation and iBOT masking from random images) is reused, so data loading is not
measured.

Baseline, measured in the same run: a plain supervised step of the same student backbone on the same
global crops (forward, linear classifier, cross-entropy, backward, AdamW) — the cost of training the
backbone without self-distillation. The ratio says what the SSL machinery (teacher, local crops,
heads, losses) costs on top.

    python benchmarks/bench_train_step.py --config train/vit_tiny_cpu --device cpu --iters 10
    python benchmarks/bench_train_step.py --config train/vitl_cellsim_register --device cuda \
        train.batch_size_per_gpu=32
"""

import argparse
import copy
import statistics
from functools import partial

import torch
from common import build_bench_config, make_batch, time_interleaved

from dinov2.train.metrics_logger import peak_memory_mb
from dinov2.train.train import build_model, optimizer_step
from dinov2.utils.config import apply_scaling_rules_to_cfg


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="config file or packaged name (train/vit_tiny_cpu)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=128, help="side of the random source images")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    cfg = build_bench_config(args.config, args.opts)
    apply_scaling_rules_to_cfg(cfg, world_size=1)
    torch.manual_seed(0)
    model = build_model(cfg, device)
    optimizer = torch.optim.AdamW(model.get_params_groups(), lr=cfg.optim.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    batch = make_batch(cfg, args.image_size, seed=0)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    bs = cfg.train.batch_size_per_gpu
    n_params = sum(p.numel() for p in model.student["backbone"].parameters())

    def ssl_step():
        optimizer.zero_grad(set_to_none=True)
        model.forward_backward(batch, teacher_temp=cfg.teacher.teacher_temp)
        optimizer_step(model, optimizer, scaler, None, cfg.optim.clip_grad)
        model.update_teacher(cfg.teacher.momentum_teacher)

    # Peak memory of the SSL step alone, over its warm-up steps.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        ssl_step()
    ssl_mem = peak_memory_mb(device)
    steps = {"ssl": ssl_step}
    if not args.no_baseline:
        steps["baseline"] = make_supervised_step(model, batch, device)
        for _ in range(args.warmup):
            steps["baseline"]()
    # Alternate the two steps so both see the same load on a shared machine.
    times = time_interleaved(steps, args.iters, device, rotate=False)
    ssl_s = statistics.median(times["ssl"])
    result = {"ssl_images_per_second": bs / ssl_s, "ssl_step_seconds": ssl_s, "ssl_peak_memory_mb": ssl_mem}
    print(f"config {args.config} on {device} ({torch.get_num_threads()} CPU threads), batch {bs}, "
          f"backbone {n_params / 1e6:.2f}M params, crops {cfg.crops.global_crops_size}/"
          f"{cfg.crops.local_crops_size} x 2+{cfg.crops.local_crops_number}")  # fmt: skip
    print(
        f"SSL step:        {ssl_s * 1000:8.1f} ms  {bs / ssl_s:8.1f} images/s  peak memory {ssl_mem:.0f} MiB"
    )
    if "baseline" in times:
        base_s = statistics.median(times["baseline"])
        result["baseline_images_per_second"] = bs / base_s
        result["ssl_over_baseline_time"] = ssl_s / base_s
        print(f"baseline step:   {base_s * 1000:8.1f} ms  {bs / base_s:8.1f} images/s  (supervised, same "
              f"backbone, 2 global crops per image)")  # fmt: skip
        print(f"SSL step / baseline step time: {ssl_s / base_s:.2f}x")
    return result


def make_supervised_step(model, batch: dict, device: torch.device):
    """The baseline: a supervised step (linear classifier, cross-entropy, AdamW) of a copy of the
    student backbone on the batch's global crops."""
    backbone = copy.deepcopy(model.student["backbone"])
    classifier = torch.nn.Linear(backbone.embed_dim, 8).to(device)
    optimizer = torch.optim.AdamW(list(backbone.parameters()) + list(classifier.parameters()), lr=1e-4)
    images = batch["collated_global_crops"]
    labels = torch.randint(0, 8, (images.shape[0],), device=device)
    dtype = model.autocast_dtype or torch.float32
    autocast = partial(torch.autocast, device_type=device.type, dtype=dtype,
                       enabled=device.type == "cuda" and dtype != torch.float32)  # fmt: skip

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = torch.nn.functional.cross_entropy(classifier(backbone(images)).float(), labels)
        loss.backward()
        optimizer.step()

    return step


if __name__ == "__main__":
    main()
