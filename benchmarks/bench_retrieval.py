"""Benchmark: exact top-K retrieval (exact_top_k) vs faiss IndexFlatIP vs torch matmul + topk.

    python benchmarks/bench_retrieval.py [--users 5000] [--items 100000] [--dim 64] [--k 500]
                                         [--threads 2] [--device cpu|cuda]

All three search the same unit-norm random embeddings with the same k and thread count
(faiss only on the CPU). Each is timed best of --repeats after a warm-up; exact_top_k's
scores are checked against faiss's (or torch's on CUDA). Reports users/s, the ratios, and
the process's peak RSS after each method. The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable

import numpy as np
import torch

from recsys_assets.pipeline.retrieval import exact_top_k

Search = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def unit_vectors(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def best_rate(search: Search, users: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    """Users per second, best of `repeats` full passes, after a small warm-up pass."""
    search(users[: min(len(users), 256)])
    best = float("inf")
    scores = np.empty(0, dtype=np.float32)
    for _ in range(repeats):
        started = time.perf_counter()
        _, scores = search(users)
        best = min(best, time.perf_counter() - started)
    return len(users) / best, scores


def torch_matmul_topk(items: np.ndarray, k: int, user_batch: int, device: torch.device) -> Search:
    """The plain baseline: per user batch, one full matmul and one topk."""
    item_matrix = torch.from_numpy(items).to(device)

    def search(users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        positions, scores = [], []
        for start in range(0, len(users), user_batch):
            batch = torch.from_numpy(users[start : start + user_batch]).to(device)
            values, index = torch.topk(batch @ item_matrix.T, k, dim=1)
            positions.append(index.cpu().numpy())
            scores.append(values.cpu().numpy())
        return np.concatenate(positions), np.concatenate(scores)

    return search


def faiss_flat_ip(items: np.ndarray, k: int) -> Search:
    import faiss

    index = faiss.IndexFlatIP(items.shape[1])
    index.add(items)

    def search(users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, positions = index.search(users, k)
        return positions, scores

    return search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--item-chunk", type=int, default=50_000)
    parser.add_argument("--user-batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rng = np.random.default_rng(args.seed)
    items = unit_vectors(rng, args.items, args.dim)
    users = unit_vectors(rng, args.users, args.dim)

    def ours(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return exact_top_k(
            batch,
            items,
            args.k,
            item_chunk=args.item_chunk,
            user_batch=args.user_batch,
            device=device,
        )

    methods: dict[str, Search] = {"exact_top_k": ours}
    if device.type == "cpu":
        import faiss

        faiss.omp_set_num_threads(args.threads)
        methods["faiss_flat_ip"] = faiss_flat_ip(items, args.k)
    methods["torch_matmul_topk"] = torch_matmul_topk(items, args.k, args.user_batch, device)

    rates: dict[str, float] = {}
    rss: dict[str, float] = {}
    results: dict[str, np.ndarray] = {}
    for name, search in methods.items():
        rates[name], results[name] = best_rate(search, users, args.repeats)
        rss[name] = peak_rss_mib()
    reference = "faiss_flat_ip" if "faiss_flat_ip" in results else "torch_matmul_topk"
    max_score_error = float(np.abs(results["exact_top_k"] - results[reference]).max())

    print(
        f"exact top-{args.k}: {args.users} users × {args.items} items, d={args.dim}, "
        f"{args.threads} threads, device {device.type}"
    )
    print(f"{'method':<20} {'users/s':>10} {'vs exact':>9} {'peak RSS MiB':>13}")
    for name, rate in rates.items():
        print(f"{name:<20} {rate:>10.0f} {rates['exact_top_k'] / rate:>8.2f}x {rss[name]:>13.0f}")
    print(f"max |score difference| exact_top_k vs {reference}: {max_score_error:.2e}")
    summary = {
        "users": args.users,
        "items": args.items,
        "dim": args.dim,
        "k": args.k,
        "threads": args.threads,
        "device": device.type,
        "users_per_s": {name: round(rate, 1) for name, rate in rates.items()},
        "ratio_vs_faiss": (
            round(rates["exact_top_k"] / rates["faiss_flat_ip"], 3)
            if "faiss_flat_ip" in rates
            else None
        ),
        "ratio_vs_torch": round(rates["exact_top_k"] / rates["torch_matmul_topk"], 3),
        "peak_rss_mib": {name: round(value, 1) for name, value in rss.items()},
        "max_score_error": max_score_error,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
