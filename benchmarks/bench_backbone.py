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
import gc
import multiprocessing as mp
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from common import print_status, time_interleaved
from torch import nn

from dinov2.models.vision_transformer import ARCHS, DinoVisionTransformer


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
    """Peak bytes of the window: CUDA allocator peak, or peak RSS over `rss0` on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes() - rss0


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
MODEL_CASES = ("ref", "ours", "compiled")
MULTICROP_CASES = ("mc_separate", "mc_packed", "mc_blockdiag")


def make_runners(args, device: torch.device, cases: list[str]) -> tuple[dict, dict, dict]:
    """Callables for each case: (forward-only runners, forward+backward runners, info per case)."""
    ours, ref = build_pair(args)
    ours, ref = ours.to(device), ref.to(device)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)  # noqa: E731
    x = torch.randn(args.batch, 3, args.img, args.img, device=device)
    g = torch.randn(2 * args.mc_images, 3, args.img, args.img, device=device)
    local = torch.randn(8 * args.mc_images, 3, args.local_img, args.local_img, device=device)
    compiled = torch.compile(ours) if "compiled" in cases else None
    # model(x, is_training=True) is the call training makes, and the one torch.compile compiles.
    calls = {
        "ref": (ref, lambda: ref(x, is_training=True), args.batch),
        "ours": (ours, lambda: ours(x, is_training=True), args.batch),
        "compiled": (ours, lambda: compiled(x, is_training=True), args.batch),
        "mc_separate": (
            ours,
            lambda: [ours.forward_features(g), ours.forward_features(local)],
            10 * args.mc_images,
        ),
        "mc_packed": (
            ours,
            lambda: ours.forward_features_list([g, local], [None, None]),
            10 * args.mc_images,
        ),
        "mc_blockdiag": (ours, lambda: blockdiag_forward(ours, [g, local]), 10 * args.mc_images),
    }
    fwd, fb, info = {}, {}, {}
    for case in cases:
        model, run, images = calls[case]

        def forward(model=model, run=run):
            model.eval()
            with torch.no_grad(), autocast():
                run()

        def forward_backward(model=model, run=run):
            model.train()
            with autocast():
                loss = loss_of(run())
            loss.backward()
            for p in model.parameters():
                p.grad = None

        fwd[case], fb[case], info[case] = forward, forward_backward, {"images": images}
    # Every variant computes the same function: check it once.
    with torch.no_grad():
        ours.eval(), ref.eval()
        if "ref" in cases:
            a, b = ours(x, is_training=True), ref(x, is_training=True)
            info["ref"]["max_abs_diff"] = (
                (a["x_norm_patchtokens"] - b["x_norm_patchtokens"]).abs().max().item()
            )
        for case in ("mc_packed", "mc_blockdiag"):
            if case in cases:
                sep = calls["mc_separate"][1]()
                got = calls[case][1]()
                info[case]["max_abs_diff"] = max(
                    (u["x_norm_patchtokens"] - v["x_norm_patchtokens"]).abs().max().item()
                    for u, v in zip(got, sep)
                )
    return fwd, fb, info


def timing_worker(args, cases: list[str], queue) -> None:
    """All cases in one process, timed in interleaved rounds."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fwd, fb, info = make_runners(args, device, cases)
    if "compiled" in cases:
        t0 = time.perf_counter()
        fwd["compiled"]()
        info["compiled"]["compile_s_fwd"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        fb["compiled"]()
        info["compiled"]["compile_s_fb"] = time.perf_counter() - t0
    fwd_times = time_interleaved(fwd, args.iters, device, warmup=args.warmup)
    fb_times = time_interleaved(fb, args.iters, device, warmup=args.warmup)
    for case in cases:
        info[case].update(fwd=fwd_times[case], fb=fb_times[case])
    queue.put(info)


def memory_worker(args, case: str, queue) -> None:
    """Peak memory of one case in a fresh process: growth over the RSS after building the model,
    during one forward and one forward+backward (each after a warm-up run)."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fwd, fb, _ = make_runners(args, device, [case])
    gc.collect()
    base = current_rss_bytes()
    out = {}
    for name, fn in (("peak_fwd", fwd[case]), ("peak_fb", fb[case])):
        fn()  # warm-up (and compilation for the compiled case)
        start_peak(device)
        fn()
        out[name] = peak_memory(device, base)
    queue.put(out)


def in_subprocess(target, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def measure(args, cases: list[str]) -> dict:
    print_status(f"timing {', '.join(cases)} ...")
    res = in_subprocess(timing_worker, args, cases)
    for case in cases:
        print_status(f"peak memory of {case} ...")
        res[case].update(in_subprocess(memory_worker, args, case))
    return res


def fmt(result: dict, key: str) -> str:
    times = result[key]
    best, med = min(times), statistics.median(times)
    return f"{best * 1e3:9.1f} ms (median {med * 1e3:8.1f})  {result['images'] / best:8.1f} img/s"


def mib(n: int) -> str:
    return f"{n / 2**20:8.1f} MiB"


def ratio(base: dict, new: dict, key: str) -> float:
    return min(base[key]) / min(new[key])


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
    parser.add_argument("--skip-models", action="store_true", help="only the multi-crop comparison")
    args = parser.parse_args(argv)
    if args.img % args.patch or args.local_img % args.patch:
        parser.error(f"--img and --local-img must be multiples of --patch {args.patch}")

    print(
        f"backbone benchmark: {args.arch}/{args.patch} reg{args.registers} batch {args.batch} {args.img}px "
        f"device {args.device} threads {args.threads} bf16 {args.bf16} torch {torch.__version__} "
        f"(cpus visible: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; "
        f"best of {args.iters} interleaved rounds after {args.warmup} warm-up)"
    )
    if not args.skip_models:
        cases = ["ref", "ours"] + (["compiled"] if args.compile else [])
        res = measure(args, cases)
        print(f"\nreference vs ours max |diff| of patch tokens: {res['ref']['max_abs_diff']:.2e}")
        print(f"{'model':<22}{'forward':<44}{'forward+backward':<44}{'peak fwd':>12}{'peak f+b':>12}")
        names = {"ref": "reference (explicit)", "ours": "ours (SDPA)", "compiled": "ours + torch.compile"}
        for c in cases:
            r = res[c]
            peaks = f"{mib(r['peak_fwd']):>12}{mib(r['peak_fb']):>12}"
            print(f"{names[c]:<22}{fmt(r, 'fwd'):<44}{fmt(r, 'fb'):<44}{peaks}")
        for c in cases[1:]:
            print(
                f"speed-up of {names[c]} over reference: forward x{ratio(res['ref'], res[c], 'fwd'):.2f}, "
                f"forward+backward x{ratio(res['ref'], res[c], 'fb'):.2f}"
            )
        if args.compile:
            r, o = res["compiled"], res["ours"]
            print(
                f"torch.compile over eager ours: forward x{ratio(o, r, 'fwd'):.2f}, forward+backward "
                f"x{ratio(o, r, 'fb'):.2f} (time saved: {100 * (1 - 1 / ratio(o, r, 'fb')):.0f} %); "
                f"first calls incl. compilation {r['compile_s_fwd']:.0f} s (fwd) + "
                f"{r['compile_s_fb']:.0f} s (f+b); "
                "peak memory includes the compiled code"
            )
    if args.skip_multicrop:
        return
    n = args.mc_images
    print(
        f"\nmulti-crop: {2 * n}x{args.img}px + {8 * n}x{args.local_img}px crops "
        f"({2 * n * (1 + args.registers + (args.img // args.patch) ** 2)} + "
        f"{8 * n * (1 + args.registers + (args.local_img // args.patch) ** 2)} tokens)"
    )
    mc = measure(args, list(MULTICROP_CASES))
    labels = {
        "mc_separate": "one call per crop size",
        "mc_packed": "forward_features_list (packed)",
        "mc_blockdiag": "block-diagonal mask, 1 SDPA",
    }
    print(f"{'variant':<32}{'forward':<44}{'forward+backward':<44}{'peak f+b':>12}")
    for c, r in mc.items():
        diff = f"  max|diff| {r['max_abs_diff']:.1e}" if "max_abs_diff" in r else ""
        print(f"{labels[c]:<32}{fmt(r, 'fwd'):<44}{fmt(r, 'fb'):<44}{mib(r['peak_fb']):>12}{diff}")
    for c in ("mc_packed", "mc_blockdiag"):
        print(
            f"{labels[c]} vs separate: forward x{ratio(mc['mc_separate'], mc[c], 'fwd'):.2f}, "
            f"forward+backward x{ratio(mc['mc_separate'], mc[c], 'fb'):.2f}"
        )


if __name__ == "__main__":
    main()
