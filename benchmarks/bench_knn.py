"""Benchmark: chunked cosine k-NN (dinov2.eval.knn) on N_test x N_train x D random features.

Prints the time of `knn_predict` for ks (1, 20) at the full size (default 100k x 100k x 384, CPU,
2 threads), and, as the named baseline, scikit-learn's KNeighborsClassifier(metric="cosine",
algorithm="brute") next to ours on a smaller size where sklearn finishes in reasonable time
(default 10k x 10k). The full similarity matrix is never materialised (100k x 100k float32 = 40 GB).

    .venv/bin/python benchmarks/bench_knn.py                       # defaults above
    .venv/bin/python benchmarks/bench_knn.py --n 20000 --baseline-n 5000 --threads 1
"""

from __future__ import annotations

import argparse
import os
import time

from common import host_summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="train and test size of the main run")
    p.add_argument("--dim", type=int, default=384, help="feature dimension")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 20])
    p.add_argument("--threads", type=int, default=2, help="torch / BLAS threads")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--baseline-n", type=int, default=10_000, help="size of the sklearn comparison (0: skip)")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import numpy as np
    import torch

    from dinov2.eval.knn import knn_predict

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)

    def data(n):
        # Noise 6 per dimension: 1-NN / 20-NN reach ~50 % / ~80 %, not a trivially separable set.
        centers = rng.normal(size=(args.classes, args.dim)).astype(np.float32)
        ytr, yte = rng.integers(0, args.classes, n), rng.integers(0, args.classes, n)
        xtr = centers[ytr] + 6.0 * rng.normal(size=(n, args.dim)).astype(np.float32)
        xte = centers[yte] + 6.0 * rng.normal(size=(n, args.dim)).astype(np.float32)
        return xtr, ytr, xte, yte

    print(f"host: {host_summary()}, torch {torch.__version__}, threads={args.threads}, device={args.device}")
    if args.baseline_n:
        n = args.baseline_n
        xtr, ytr, xte, yte = data(n)
        t = time.perf_counter()
        ours = knn_predict(xtr, ytr, xte, ks=args.ks, chunk_size=args.chunk_size, device=args.device)
        t_ours = time.perf_counter() - t
        from sklearn.neighbors import KNeighborsClassifier

        t = time.perf_counter()
        same = True
        for k in args.ks:
            sk = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute", n_jobs=args.threads)
            ref = sk.fit(xtr, ytr).predict(xte)
            if k == 1:
                same = bool((ref == ours[1]).all())
        t_sk = time.perf_counter() - t
        print(
            f"[baseline size] {n} x {n} x {args.dim}, ks={args.ks}: "
            f"dinov2 chunked kNN {t_ours:.2f} s | sklearn brute cosine {t_sk:.2f} s "
            f"({t_sk / t_ours:.1f}x slower); 1-NN predictions identical: {same}"
        )
    n = args.n
    xtr, ytr, xte, yte = data(n)
    t = time.perf_counter()
    preds = knn_predict(xtr, ytr, xte, ks=args.ks, chunk_size=args.chunk_size, device=args.device)
    dt = time.perf_counter() - t
    acc = {k: float((preds[k] == yte).mean()) for k in args.ks}
    gflop = 2.0 * n * n * args.dim / 1e9
    print(
        f"[main] {n} x {n} x {args.dim}, ks={args.ks}, chunk={args.chunk_size}: {dt:.2f} s "
        f"({gflop / dt:.1f} GFLOP/s in the similarity matmul; "
        f"a dense matrix would take {4 * n * n / 1e9:.1f} GB); "
        f"accuracy {acc}"
    )


if __name__ == "__main__":
    main()
