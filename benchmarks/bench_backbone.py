"""Speed and memory of the DINOv2 backbone against a plain reference ViT, on CPU or CUDA.

    python benchmarks/bench_backbone.py --arch vit_small --batch 8 --img 224 --threads 2 --registers 4
    python benchmarks/bench_backbone.py --arch vit_small --batch 8 --img 224 --compile
    python benchmarks/bench_backbone.py --arch vit_large --batch 32 --device cuda --compile

Prints, for our DinoVisionTransformer and for `ReferenceViT` (written below: explicit softmax
attention, unfused ops, DINOv2's structure, same weights and outputs), the forward time (inference,
no grad), forward+backward time (training mode), images/s and peak memory, with the ratios; with
--compile the same for torch.compile(our model); and the multi-crop comparison of
`forward_features_list` (packed) against one `forward_features` call per crop size and against one
attention call over all crops with a block-diagonal mask.

Each measurement runs in a fresh subprocess so its peak memory is its own: on CPU the peak
resident-set growth (getrusage ru_maxrss minus the RSS before the workload), on CUDA
torch.cuda.max_memory_allocated. Times are the best (and median) of --iters runs after --warmup
runs: on a shared machine the best run is the least disturbed one.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinov2.models.vision_transformer import ARCHS, DinoVisionTransformer  # noqa: E402


# ------------------------------------------------------------------------------------ baseline
class RefBlock(nn.Module):
    """Pre-norm block with explicit attention: softmax(q k^T * scale) v, no fused kernels."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.ls1 = nn.Module()
        self.ls1.gamma = nn.Parameter(torch.full((dim,), 1e-5))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, hidden)
        self.mlp.fc2 = nn.Linear(hidden, dim)
        self.ls2 = nn.Module()
        self.ls2.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.norm1(x)
        q, k, v = self.attn.qkv(h).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        a = (attn @ v).transpose(1, 2).reshape(b, n, c)
        x = x + self.ls1.gamma * self.attn.proj(a)
        return x + self.ls2.gamma * self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class ReferenceViT(nn.Module):
    """Straightforward DINOv2-style ViT (cls + registers + patches, learned positions, LayerScale),
    with the same parameter names as DinoVisionTransformer so the same weights load."""

    def __init__(self, img: int, patch: int, dim: int, depth: int, heads: int, registers: int) -> None:
        super().__init__()
        self.patch = patch
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, stride=patch)
        n = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim)) if registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList(RefBlock(dim, heads, 4 * dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.registers = registers

    def forward_features(self, x: torch.Tensor) -> dict:
        b = x.shape[0]
        t = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(b, -1, -1), t], dim=1) + self.pos_embed
        if self.register_tokens is not None:
            t = torch.cat([t[:, :1], self.register_tokens.expand(b, -1, -1), t[:, 1:]], dim=1)
        for blk in self.blocks:
            t = blk(t)
        t = self.norm(t)
        return {"x_norm_clstoken": t[:, 0], "x_norm_patchtokens": t[:, 1 + self.registers :]}

    def forward(self, x: torch.Tensor, is_training: bool = False):
        out = self.forward_features(x)
        return out if is_training else out["x_norm_clstoken"]


# ------------------------------------------------------------------------------------ helpers
def build_pair(args) -> tuple[DinoVisionTransformer, ReferenceViT]:
    torch.manual_seed(0)
    ours = ARCHS[args.arch](
        patch_size=args.patch,
        img_size=args.img,
        num_register_tokens=args.registers,
        init_values=1e-5,
        block_chunks=0,
        drop_path_rate=args.drop_path,
    )
    ref = ReferenceViT(args.img, args.patch, ours.embed_dim, ours.n_blocks, ours.num_heads, args.registers)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since the last reset_peak_rss (VmHWM), else over the process lifetime (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def start_peak(device: torch.device) -> int:
    """Begin a peak-memory window; returns the RSS at its start."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak_rss()
    return current_rss_bytes()


def peak_memory(device: torch.device, rss0: int) -> int:
    """Peak bytes of the window: CUDA allocator peak, or peak RSS growth over `rss0` on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes() - rss0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], None], warmup: int, iters: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def loss_of(out) -> torch.Tensor:
    outs = out if isinstance(out, list) else [out]
    return sum(
        o["x_norm_clstoken"].float().square().mean() + o["x_norm_patchtokens"].float().square().mean()
        for o in outs
    )


def blockdiag_forward(model: DinoVisionTransformer, xs: list[torch.Tensor]) -> list[dict]:
    """Alternative packing: every crop's tokens in one sequence [1, T, D] and one attention call
    with a block-diagonal boolean mask (each image attends only to itself)."""
    toks = [model.prepare_tokens_with_masks(x) for x in xs]
    shapes = [t.shape[:2] for t in toks]
    packed = torch.cat([t.reshape(-1, t.shape[-1]) for t in toks]).unsqueeze(0)
    lengths = torch.tensor([n for b, n in shapes for _ in range(b)], device=packed.device)
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=packed.device), lengths)
    mask = seg[:, None] == seg[None, :]
    for blk in model.iter_blocks():
        packed = packed + blk.ls1(blk.attn(blk.norm1(packed), attn_bias=mask))
        packed = packed + blk.ls2(blk.mlp(blk.norm2(packed)))
    parts = packed[0].split([b * n for b, n in shapes])
    return [model._output_dict(p.view(b, n, -1), None) for p, (b, n) in zip(parts, shapes)]


# ------------------------------------------------------------------------------------ workers
def run_case(case: str, args, queue) -> None:
    """One measurement in a fresh process; puts a result dict on `queue`."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ours, ref = build_pair(args)
    dtype_ctx = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if args.bf16
        else (lambda: torch.autocast(device.type, enabled=False))
    )
    result: dict = {"case": case}
    if case.startswith("mc_"):
        model = ours.to(device)
        g = torch.randn(2 * args.mc_images, 3, args.img, args.img, device=device)
        local = torch.randn(8 * args.mc_images, 3, args.local_img, args.local_img, device=device)
        runners = {
            "mc_packed": lambda: model.forward_features_list([g, local], [None, None]),
            "mc_separate": lambda: [model.forward_features(g), model.forward_features(local)],
            "mc_blockdiag": lambda: blockdiag_forward(model, [g, local]),
        }
        if case not in runners:
            raise ValueError(case)
        run = runners[case]
        if case != "mc_separate":  # same results as separate calls
            with torch.no_grad():
                model.eval()
                a, b = run(), runners["mc_separate"]()
                result["max_abs_diff"] = max(
                    (x["x_norm_patchtokens"] - y["x_norm_patchtokens"]).abs().max().item()
                    for x, y in zip(a, b)
                )
        images = 10 * args.mc_images
    else:
        model = {"ours": ours, "ref": ref, "compiled": ours}[case].to(device)
        if case == "compiled":
            t0 = time.perf_counter()
            model = torch.compile(model)
        x = torch.randn(args.batch, 3, args.img, args.img, device=device)
        # model(x, is_training=True) is the call training makes, and the one torch.compile compiles.
        run = lambda: model(x, is_training=True)  # noqa: E731
        images = args.batch
        if case == "ref":
            with torch.no_grad():
                ours.eval()
                a, b = ours.forward_features(x), ref.forward_features(x)
                result["max_abs_diff"] = (
                    (a["x_norm_patchtokens"] - b["x_norm_patchtokens"]).abs().max().item()
                )
    target = model if isinstance(model, nn.Module) else ours

    def forward():
        with torch.no_grad(), dtype_ctx():
            run()

    def forward_backward():
        with dtype_ctx():
            loss = loss_of(run())
        loss.backward()
        for p in target.parameters():
            p.grad = None

    target.eval()
    if case == "compiled":
        forward()
        result["compile_s_fwd"] = time.perf_counter() - t0
    rss0 = start_peak(device)
    result["fwd"] = time_runs(forward, args.warmup, args.iters, device)
    result["peak_fwd"] = peak_memory(device, rss0)
    target.train()
    if case == "compiled":
        t1 = time.perf_counter()
        forward_backward()
        result["compile_s_fb"] = time.perf_counter() - t1
    rss0 = start_peak(device)
    result["fb"] = time_runs(forward_backward, args.warmup, args.iters, device)
    result["peak_fb"] = peak_memory(device, rss0)
    result["images"] = images
    queue.put(result)


def measure(case: str, args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=run_case, args=(case, args, queue))
    proc.start()
    print(f"[{time.strftime('%H:%M:%S')}] measuring {case} ...", flush=True)
    result = queue.get()
    proc.join()
    return result


def fmt(result: dict, key: str) -> str:
    times = result[key]
    best, med = min(times), statistics.median(times)
    return f"{best * 1e3:9.1f} ms (median {med * 1e3:8.1f})  {result['images'] / best:8.1f} img/s"


def mib(n: int) -> str:
    return f"{n / 2**20:8.1f} MiB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="vit_small", choices=sorted(ARCHS))
    parser.add_argument("--patch", type=int, default=14)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--registers", type=int, default=4)
    parser.add_argument(
        "--drop-path", type=float, default=0.0, help="stochastic depth of our model (0: same math)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile(our model)")
    parser.add_argument(
        "--mc-images", type=int, default=1, help="multi-crop: images giving 2 global + 8 local"
    )
    parser.add_argument("--local-img", type=int, default=98)
    parser.add_argument("--skip-multicrop", action="store_true")
    args = parser.parse_args(argv)
    if args.img % args.patch or args.local_img % args.patch:
        parser.error(f"--img and --local-img must be multiples of --patch {args.patch}")

    print(
        f"backbone benchmark: {args.arch}/{args.patch} reg{args.registers} batch {args.batch} {args.img}px "
        f"device {args.device} threads {args.threads} bf16 {args.bf16} torch {torch.__version__} "
        f"(cpus visible: {os.cpu_count()}; best of {args.iters} after {args.warmup} warm-up)"
    )
    cases = ["ref", "ours"] + (["compiled"] if args.compile else [])
    res = {c: measure(c, args) for c in cases}
    print(f"\nreference vs ours max |diff| of patch tokens: {res['ref']['max_abs_diff']:.2e}")
    print(f"{'model':<22}{'forward':<44}{'forward+backward':<44}{'peak fwd':>12}{'peak f+b':>12}")
    names = {"ref": "reference (explicit)", "ours": "ours (SDPA)", "compiled": "ours + torch.compile"}
    for c in cases:
        r = res[c]
        peaks = f"{mib(r['peak_fwd']):>12}{mib(r['peak_fb']):>12}"
        print(f"{names[c]:<22}{fmt(r, 'fwd'):<44}{fmt(r, 'fb'):<44}{peaks}")
    base = res["ref"]
    for c in cases[1:]:
        r = res[c]
        print(
            f"speed-up of {names[c]} over reference: forward x{min(base['fwd']) / min(r['fwd']):.2f}, "
            f"forward+backward x{min(base['fb']) / min(r['fb']):.2f}"
        )
    if args.compile:
        r, o = res["compiled"], res["ours"]
        print(
            f"torch.compile over eager ours: forward x{min(o['fwd']) / min(r['fwd']):.2f} "
            f"({100 * (1 - min(r['fwd']) / min(o['fwd'])):.0f} % less time), forward+backward "
            f"x{min(o['fb']) / min(r['fb']):.2f} "
            f"({100 * (1 - min(r['fb']) / min(o['fb'])):.0f} % less time); "
            f"compile time {r['compile_s_fwd']:.0f} s (fwd) + {r['compile_s_fb']:.0f} s (f+b)"
        )
    if args.skip_multicrop:
        return
    n = args.mc_images
    print(
        f"\nmulti-crop: {2 * n}x{args.img}px + {8 * n}x{args.local_img}px crops "
        f"({2 * n * (1 + args.registers + (args.img // args.patch) ** 2)} + "
        f"{8 * n * (1 + args.registers + (args.local_img // args.patch) ** 2)} tokens)"
    )
    mc = {c: measure(c, args) for c in ("mc_separate", "mc_packed", "mc_blockdiag")}
    labels = {
        "mc_separate": "one call per crop size",
        "mc_packed": "forward_features_list (packed)",
        "mc_blockdiag": "block-diagonal mask, 1 SDPA",
    }
    for c, r in mc.items():
        diff = f"  max|diff| {r['max_abs_diff']:.1e}" if "max_abs_diff" in r else ""
        print(f"{labels[c]:<32}{fmt(r, 'fwd'):<44}{fmt(r, 'fb'):<44}{mib(r['peak_fb']):>12}{diff}")
    sep = mc["mc_separate"]
    for c in ("mc_packed", "mc_blockdiag"):
        r = mc[c]
        print(
            f"{labels[c]} vs separate: forward x{min(sep['fwd']) / min(r['fwd']):.2f}, "
            f"forward+backward x{min(sep['fb']) / min(r['fb']):.2f}"
        )


if __name__ == "__main__":
    main()
