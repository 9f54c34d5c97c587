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
import statistics
import tempfile
import time
from functools import partial

import torch

from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.data.collate import collate_data_and_cast
from dinov2.data.masking import MaskingGenerator
from dinov2.train.metrics_logger import peak_memory_mb
from dinov2.train.train import build_model, optimizer_step
from dinov2.utils.config import apply_scaling_rules_to_cfg, build_config


def make_batch(cfg, image_size: int, seed: int) -> dict:
    """One collated multi-crop batch of `train.batch_size_per_gpu` random RGB images."""
    g = torch.Generator().manual_seed(seed)
    aug = DataAugmentationDINO(
        cfg.crops.global_crops_scale,
        cfg.crops.local_crops_scale,
        cfg.crops.local_crops_number,
        global_crops_size=cfg.crops.global_crops_size,
        local_crops_size=cfg.crops.local_crops_size,
    )
    samples = [
        (aug(torch.randint(0, 256, (3, image_size, image_size), dtype=torch.uint8, generator=g)), -1)
        for _ in range(cfg.train.batch_size_per_gpu)
    ]
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    return collate_data_and_cast(
        samples,
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
        dtype=torch.float32,
        n_tokens=grid * grid,
        mask_generator=MaskingGenerator((grid, grid), max_num_patches=int(0.5 * grid * grid)),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, iters: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds per call of `step` over `iters` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


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

    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(args.config, args.opts, output_dir=tmp, check_paths=False)
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

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ssl_times = time_steps(ssl_step, args.iters, args.warmup, device)
    ssl_mem = peak_memory_mb(device)
    result = {
        "ssl_images_per_second": bs / statistics.median(ssl_times),
        "ssl_step_seconds": statistics.median(ssl_times),
        "ssl_peak_memory_mb": ssl_mem,
    }
    print(f"config {args.config} on {device} ({torch.get_num_threads()} CPU threads), batch {bs}, "
          f"backbone {n_params / 1e6:.2f}M params, crops {cfg.crops.global_crops_size}/"
          f"{cfg.crops.local_crops_size} x 2+{cfg.crops.local_crops_number}")  # fmt: skip
    print(f"SSL step:        {result['ssl_step_seconds'] * 1000:8.1f} ms  "
          f"{result['ssl_images_per_second']:8.1f} images/s  peak memory {ssl_mem:.0f} MiB")  # fmt: skip

    if not args.no_baseline:
        backbone = model.student["backbone"]
        classifier = torch.nn.Linear(backbone.embed_dim, 8).to(device)
        base_opt = torch.optim.AdamW(list(backbone.parameters()) + list(classifier.parameters()), lr=1e-4)
        images = batch["collated_global_crops"]
        labels = torch.randint(0, 8, (images.shape[0],), device=device)
        autocast = partial(
            torch.autocast, device_type=device.type, dtype=model.autocast_dtype or torch.float32,
            enabled=device.type == "cuda" and model.autocast_dtype not in (None, torch.float32),
        )  # fmt: skip

        def supervised_step():
            base_opt.zero_grad(set_to_none=True)
            with autocast():
                loss = torch.nn.functional.cross_entropy(classifier(backbone(images)).float(), labels)
            loss.backward()
            base_opt.step()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        base_times = time_steps(supervised_step, args.iters, args.warmup, device)
        result["baseline_images_per_second"] = bs / statistics.median(base_times)
        result["ssl_over_baseline_time"] = statistics.median(ssl_times) / statistics.median(base_times)
        print(f"baseline step:   {statistics.median(base_times) * 1000:8.1f} ms  "
              f"{result['baseline_images_per_second']:8.1f} images/s  (supervised, same backbone, "
              f"2 global crops per image)")  # fmt: skip
        print(f"SSL step / baseline step time: {result['ssl_over_baseline_time']:.2f}x")
    return result


if __name__ == "__main__":
    main()
