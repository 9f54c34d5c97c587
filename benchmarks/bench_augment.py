"""Multi-crop augmentation throughput: DataAugmentationDINO vs a plain torchvision-on-PIL DINOv2 recipe.

Measures end-to-end images/s of one process (JPEG file -> decoded RGB image -> 2 global + N local
normalised crops) for both pipelines in the same run, alternating them image by image so that both
see the same machine load, and prints the best and median of the repeats and their ratio, by
wall-clock and by process CPU time (the latter is robust to other jobs on a shared machine).

    python benchmarks/bench_augment.py                      # 200 synthetic 360x360 JPEGs, 1 thread
    python benchmarks/bench_augment.py --images DIR --n 500 --threads 1 --repeats 5

Without --images, 360x360 JPEGs are generated in a temporary folder (with
dinov2.data.synthetic.generate_synthetic_cells when available, else with PIL drawing).
"""

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import common  # noqa: F401 (imported for its effect: this checkout's dinov2 first on sys.path)
import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFilter
import torch
from torchvision import transforms as tv

from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

JPEG_SUFFIXES = {".jpg", ".jpeg"}


class TorchvisionPILDINO:
    """DINOv2's multi-crop recipe written with torchvision.transforms v1 on PIL images (the baseline).

    Same structure as Meta's DataAugmentationDINO; the blur probabilities are the paper's (1.0, 0.1,
    0.5), as in ours, so both pipelines do the same work.
    """

    def __init__(self, global_crops_scale, local_crops_scale, local_crops_number, global_size, local_size):
        bicubic = tv.InterpolationMode.BICUBIC

        def geometric(size, scale):
            return tv.Compose(
                [
                    tv.RandomResizedCrop(size, scale=scale, interpolation=bicubic),
                    tv.RandomHorizontalFlip(p=0.5),
                ]
            )

        def blur(p):
            return tv.RandomApply([tv.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=p)

        color = tv.Compose(
            [
                tv.RandomApply(
                    [tv.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8
                ),
                tv.RandomGrayscale(p=0.2),
            ]
        )
        normalize = tv.Compose([tv.ToTensor(), tv.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
        self.geometric_global = geometric(global_size, global_crops_scale)
        self.geometric_local = geometric(local_size, local_crops_scale)
        self.global_1 = tv.Compose([color, blur(1.0), normalize])
        self.global_2 = tv.Compose([color, blur(0.1), tv.RandomSolarize(threshold=128, p=0.2), normalize])
        self.local = tv.Compose([color, blur(0.5), normalize])
        self.local_crops_number = local_crops_number

    def __call__(self, image: PIL.Image.Image) -> dict:
        global_crops = [
            self.global_1(self.geometric_global(image)),
            self.global_2(self.geometric_global(image)),
        ]
        local_crops = [self.local(self.geometric_local(image)) for _ in range(self.local_crops_number)]
        return {
            "global_crops": global_crops,
            "global_crops_teacher": global_crops,
            "local_crops": local_crops,
            "offsets": (),
        }


def _load_rgb_function() -> Callable[[str], PIL.Image.Image]:
    """The project's image loader when present (what training uses), else Pillow open + convert."""
    try:
        from dinov2.data.image_io import load_rgb

        return load_rgb
    except ImportError:

        def load(path):
            with PIL.Image.open(path) as image:
                return image.convert("RGB")

        return load


def _draw_cells(out_dir: Path, count: int, size: int, seed: int) -> None:
    """Simple smear-like JPEGs: beige background, pink cells with purple nuclei, slight blur."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        background = np.array([240.0, 220.0, 200.0]) + rng.normal(0, 5, (size, size, 3))
        image = PIL.Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
        draw = PIL.ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 9))):
            cx, cy = (int(v) for v in rng.integers(0, size, 2))
            radius = int(rng.integers(size // 18, size // 7))
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=(215, 150, 175))
            inner = int(radius * rng.uniform(0.4, 0.7))
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=(95, 45, 135))
        image.filter(PIL.ImageFilter.GaussianBlur(1.2)).save(out_dir / f"cell_{index:05d}.jpg", quality=90)


def make_jpegs(out_dir: Path, count: int, size: int = 360, seed: int = 0) -> list[Path]:
    """Generate `count` size x size JPEGs under out_dir and return their paths."""
    try:
        from dinov2.data.synthetic import PBC_CLASSES, generate_synthetic_cells

        per_class = -(-count // len(PBC_CLASSES))
        generate_synthetic_cells(out_dir, per_class, size=size, seed=seed, progress=False)
        paths = _list_jpegs(out_dir)
        if paths:
            return paths[:count]
    except ImportError:
        pass
    _draw_cells(out_dir, count, size, seed)
    return _list_jpegs(out_dir)


def _list_jpegs(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*") if p.suffix.lower() in JPEG_SUFFIXES and not p.name.startswith(".")
    )


def time_interleaved(paths: list[Path], load: Callable, pipelines: dict[str, Callable]) -> dict[str, dict]:
    """One pass over `paths`, running every pipeline on each image in turn (order rotating per image).

    Interleaving image by image makes both pipelines see the same machine load, which matters on a
    shared machine. Returns per pipeline the wall-clock and process-CPU images/s of load + augment.
    """
    names = list(pipelines)
    wall = dict.fromkeys(names, 0.0)
    cpu = dict.fromkeys(names, 0.0)
    for index, path in enumerate(paths):
        for k in range(len(names)):
            name = names[(index + k) % len(names)]
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            pipelines[name](load(path))
            wall[name] += time.perf_counter() - wall_start
            cpu[name] += time.process_time() - cpu_start
    return {name: {"wall": len(paths) / wall[name], "cpu": len(paths) / cpu[name]} for name in names}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=None, help="folder of JPEGs (searched recursively)")
    parser.add_argument("--n", type=int, default=200, help="images per timed pass")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per pipeline")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=98)
    parser.add_argument("--local-number", type=int, default=8)
    parser.add_argument("--stain-jitter", type=float, default=0.0, help="ours only (the baseline has none)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    if args.n <= 0 or args.repeats <= 0 or args.threads <= 0:
        raise SystemExit(
            f"--n, --repeats and --threads must be positive, got {args.n}, {args.repeats}, {args.threads}"
        )
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    scales = dict(global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32))

    with tempfile.TemporaryDirectory(prefix="bench_augment_") as tmp:
        if args.images is not None:
            if not args.images.is_dir():
                raise SystemExit(f"--images {args.images} is not a folder")
            paths = _list_jpegs(args.images)
            if not paths:
                raise SystemExit(f"no .jpg/.jpeg files under {args.images}")
        else:
            print(f"generating {args.n} 360x360 JPEGs in {tmp} ...", flush=True)
            paths = make_jpegs(Path(tmp), args.n, 360, args.seed)
        paths = [paths[i % len(paths)] for i in range(args.n)]
        load = _load_rgb_function()
        with PIL.Image.open(paths[0]) as first:
            width, height = first.size
            print(f"{len(paths)} images ({width}x{height} {first.format}), torch threads {args.threads}")

        pipelines = {
            "torchvision-PIL": TorchvisionPILDINO(
                local_crops_number=args.local_number,
                global_size=args.global_size,
                local_size=args.local_size,
                **scales,
            ),
            "DataAugmentationDINO": DataAugmentationDINO(
                local_crops_number=args.local_number,
                global_crops_size=args.global_size,
                local_crops_size=args.local_size,
                stain_jitter=args.stain_jitter,
                **scales,
            ),
        }
        time_interleaved(paths[:5], load, pipelines)  # warm-up: imports, allocator, kernel selection

        runs = []
        for repeat in range(args.repeats):
            runs.append(time_interleaved(paths, load, pipelines))
            line = ", ".join(f"{name} {r['wall']:.1f} img/s" for name, r in runs[-1].items())
            print(f"repeat {repeat + 1}/{args.repeats}: {line}", flush=True)

    crops = f"2 global {args.global_size} + {args.local_number} local {args.local_size}"
    print(f"\nmulti-crop ({crops}), end-to-end JPEG -> crops, 1 process, {args.threads} thread(s):")
    summary = {}
    for clock in ("wall", "cpu"):
        best = {name: max(run[name][clock] for run in runs) for name in pipelines}
        median = {name: statistics.median(run[name][clock] for run in runs) for name in pipelines}
        ratios = [run["DataAugmentationDINO"][clock] / run["torchvision-PIL"][clock] for run in runs]
        summary[clock] = {"best": best, "median": median, "ratio_median": statistics.median(ratios)}
        label = "wall-clock" if clock == "wall" else "process CPU time"
        print(f"  [{label}]")
        for name in pipelines:
            print(f"    {name:22s} best {best[name]:7.1f} img/s   median {median[name]:7.1f} img/s")
        best_ratio = best["DataAugmentationDINO"] / best["torchvision-PIL"]
        print(
            f"    speed-up (ours / baseline): best/best {best_ratio:.2f}x"
            f"   median of paired repeats {statistics.median(ratios):.2f}x   (target >= 2x)"
        )
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
