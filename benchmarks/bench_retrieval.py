"""Benchmark: exact top-K retrieval (exact_top_k) side by side with its bare search, and
the flat, IVF and HNSW indexes side by side.

    python benchmarks/bench_retrieval.py [--users 5000] [--items 100000] [--dim 64] [--k 500]
                                         [--threads 2] [--repeats 3] [--device cpu|cuda]
                                         [--indexes flat,ivf,hnsw] [--clusters 256]
                                         [--nlist 1024] [--nprobe 64] [--m 32] [--ef-search 512]

On the CPU, exact_top_k (a faiss IndexFlatIP search plus the canonical rescoring, ordering
and settling of pipeline/retrieval.py) against a bare faiss IndexFlatIP search built once
over the same items; on CUDA against a bare torch matmul + topk. Both search the same
unit-norm random embeddings with the same k and thread count. After one warm-up each, the
two run alternately --repeats times (so a noisy machine slows both alike) and the best pass
of each counts. Reports users/s, the ratio (target >= 0.95: the wrapper costs <= 5%), the
same ratio by process CPU time (steadier on a shared machine, where other jobs' load moves
a 2-thread search's wall-clock time by ±20%), how many result positions agree with the bare
search (they differ only among scores within float32 rounding of each other), the largest
score difference, and the process's peak RSS.

Then, on the CPU, exact_top_k under each `pipeline.retrieval.index` of --indexes (ivf and
hnsw configured by --nlist/--nprobe and --m/--ef-search) on other data: users and items
scattered around --clusters random centres (0: uniform like the first part). Uniform
vectors at d = 64 are an approximate index's worst case, with no neighbourhoods to find;
trained embeddings cluster. Each index is built once (its seconds reported apart, as a
partition pays them once), then searched like the first part (best of --repeats after a
warm-up); recall@k is the share of the exact (flat) answer's items each user gets.
The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable
from functools import partial

import faiss
import numpy as np
import torch

from recsys_assets.config.settings import RetrievalConfig
from recsys_assets.models.bundle import load_bundle
from recsys_assets.pipeline.retrieval import IndexCache, exact_top_k
from recsys_assets.warehouse import Warehouse

Search = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""users -> (positions, scores), best first."""


CLUSTER_SPREAD = 0.5
"""Noise around a cluster centre, per coordinate, against the centres' 1."""


def unit_vectors(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def clustered_vectors(rng: np.random.Generator, count: int, centres: np.ndarray) -> np.ndarray:
    """Unit vectors around random `centres` (normal, per coordinate scale 1)."""
    vectors = centres[rng.integers(0, len(centres), count)]
    vectors = vectors + CLUSTER_SPREAD * rng.standard_normal(vectors.shape).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def torch_matmul_topk(items: np.ndarray, k: int, user_batch: int, device: torch.device) -> Search:
    """The bare GPU search: per user batch, one full matmul and one topk."""
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
    """The bare CPU search: one IndexFlatIP, built once, every user in one call."""
    index = faiss.IndexFlatIP(items.shape[1])
    index.add(items)

    def search(users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, positions = index.search(users, k)
        return positions, scores

    return search


def timed(search: Search, users: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(wall seconds, process CPU seconds, positions, scores) of one pass."""
    started, cpu_started = time.perf_counter(), time.process_time()
    positions, scores = search(users)
    return time.perf_counter() - started, time.process_time() - cpu_started, positions, scores


def model_embeddings(warehouse: str, users: int) -> tuple[np.ndarray, np.ndarray]:
    """(item vectors of the whole catalog, user vectors of the first `users` users) of the
    two-tower model in the warehouse's bundle: the recall an index reaches on the vectors it
    would search in production, not on synthetic ones."""
    model = load_bundle(Warehouse(warehouse)).two_tower
    if model is None:
        raise SystemExit(f"the bundle in {warehouse} has no two-tower model")
    return (
        np.ascontiguousarray(model.item_embeddings(model.item_ids), dtype=np.float32),
        np.ascontiguousarray(model.user_embeddings(model.user_ids[:users]), dtype=np.float32),
    )


def compare_indexes(
    args: argparse.Namespace, rng: np.random.Generator
) -> dict[str, dict[str, float]]:
    """Per index of --indexes: build seconds, users/s, CPU seconds and recall@k against
    flat's answer, on the data --clusters sets; printed as a table and returned for the
    summary."""
    if args.embeddings_from:
        items, users = model_embeddings(args.embeddings_from, args.users)
    elif args.clusters:
        centres = rng.standard_normal((args.clusters, args.dim)).astype(np.float32)
        items = clustered_vectors(rng, args.items, centres)
        users = clustered_vectors(rng, args.users, centres)
    else:
        items, users = (
            unit_vectors(rng, args.items, args.dim),
            unit_vectors(rng, args.users, args.dim),
        )
    names = [name for name in args.indexes.split(",") if name]
    configs = {
        name: RetrievalConfig.model_validate(
            {
                "index": name,
                "ivf": {"nlist": args.nlist, "nprobe": args.nprobe},
                "hnsw": {"m": args.m, "ef_search": args.ef_search},
            }
        )
        for name in dict.fromkeys(["flat", *names])  # flat: the exact answer recall counts
    }
    caches = {name: IndexCache() for name in configs}
    build_s = {}
    for name, config in configs.items():
        started = time.perf_counter()
        if name != "flat":
            caches[name].index_for(items, config)
        build_s[name] = time.perf_counter() - started

    def search(name: str, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return exact_top_k(
            batch,
            items,
            args.k,
            user_batch=args.user_batch,
            device="cpu",
            retrieval=configs[name],
            indexes=caches[name],
        )

    best = dict.fromkeys(configs, float("inf"))
    best_cpu = dict.fromkeys(configs, float("inf"))
    found: dict[str, np.ndarray] = {}
    for name in configs:
        search(name, users[: min(len(users), 256)])
    for _ in range(args.repeats):
        for name in configs:
            seconds, cpu_seconds, positions, _ = timed(partial(search, name), users)
            best[name] = min(best[name], seconds)
            best_cpu[name] = min(best_cpu[name], cpu_seconds)
            found[name] = positions
    rows = np.arange(len(users))[:, None] * len(items)
    exact = (found["flat"] + rows).ravel()
    table = {}
    for name in configs:
        hits = np.isin((found[name] + rows).ravel(), exact).sum()
        table[name] = {
            "build_s": round(build_s[name], 2),
            "users_per_s": round(len(users) / best[name], 1),
            "cpu_s": round(best_cpu[name], 3),
            f"recall_at_{args.k}": round(float(hits / exact.size), 5),
        }
    data = (
        f"two-tower embeddings of {args.embeddings_from}"
        if args.embeddings_from
        else f"{args.clusters} clusters"
        if args.clusters
        else "uniform"
    )
    print(
        f"indexes, top-{args.k}: {len(users)} users × {len(items)} items ({data}), "
        f"d={items.shape[1]}, {args.threads} threads; ivf nlist {args.nlist} nprobe {args.nprobe}, "
        f"hnsw m {args.m} ef_search {args.ef_search}"
    )
    print(f"{'index':<8} {'build s':>8} {'users/s':>10} {'CPU s':>8} {'recall@k':>9}")
    for name, row in table.items():
        print(
            f"{name:<8} {row['build_s']:>8.2f} {row['users_per_s']:>10.0f} "
            f"{row['cpu_s']:>8.2f} {row[f'recall_at_{args.k}']:>9.4f}"
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--item-chunk", type=int, default=50_000)
    parser.add_argument("--user-batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--indexes", default="flat,ivf,hnsw", help="comma-separated; empty: skip (CPU only)"
    )
    parser.add_argument("--clusters", type=int, default=256, help="0: uniform vectors")
    parser.add_argument(
        "--embeddings-from",
        metavar="WAREHOUSE",
        help="compare the indexes on the two-tower vectors of this warehouse's model bundle "
        "(e.g. benchmarks/output/bench_pipeline/medium) instead of synthetic ones",
    )
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, default=64)
    parser.add_argument("--m", type=int, default=32)
    parser.add_argument("--ef-search", type=int, default=512)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
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

    bare_name = "faiss_flat_ip" if device.type == "cpu" else "torch_matmul_topk"
    methods: dict[str, Search] = {
        "exact_top_k": ours,
        bare_name: (
            faiss_flat_ip(items, args.k)
            if device.type == "cpu"
            else torch_matmul_topk(items, args.k, args.user_batch, device)
        ),
    }
    best = dict.fromkeys(methods, float("inf"))
    best_cpu = dict.fromkeys(methods, float("inf"))
    rss: dict[str, float] = {}
    results: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for search in methods.values():
        search(users[: min(len(users), 256)])
    for _ in range(args.repeats):
        for name, search in methods.items():
            seconds, cpu_seconds, positions, scores = timed(search, users)
            best[name] = min(best[name], seconds)
            best_cpu[name] = min(best_cpu[name], cpu_seconds)
            results[name] = positions, scores
            rss[name] = peak_rss_mib()
    rates = {name: len(users) / seconds for name, seconds in best.items()}
    ratio = rates["exact_top_k"] / rates[bare_name]
    cpu_ratio = best_cpu[bare_name] / best_cpu["exact_top_k"]
    (our_positions, our_scores), (bare_positions, bare_scores) = (
        results["exact_top_k"],
        results[bare_name],
    )
    same_positions = float((our_positions == bare_positions).mean())
    max_score_error = float(np.abs(our_scores - bare_scores).max())

    print(
        f"exact top-{args.k}: {args.users} users × {args.items} items, d={args.dim}, "
        f"{args.threads} threads, device {device.type}, best of {args.repeats} alternating"
    )
    print(f"{'method':<20} {'users/s':>10} {'CPU s':>8} {'peak RSS MiB':>13}")
    for name, rate in rates.items():
        print(f"{name:<20} {rate:>10.0f} {best_cpu[name]:>8.2f} {rss[name]:>13.0f}")
    print(f"exact_top_k / {bare_name}: {ratio:.3f}x (target >= 0.95); by CPU time {cpu_ratio:.3f}x")
    print(
        f"positions equal to {bare_name}'s: {same_positions:.5f}; "
        f"max |score difference|: {max_score_error:.2e}"
    )
    summary = {
        "users": args.users,
        "items": args.items,
        "dim": args.dim,
        "k": args.k,
        "threads": args.threads,
        "device": device.type,
        "repeats": args.repeats,
        "users_per_s": {name: round(rate, 1) for name, rate in rates.items()},
        "ratio_vs_faiss": round(ratio, 3) if device.type == "cpu" else None,
        "ratio_vs_torch": round(ratio, 3) if device.type != "cpu" else None,
        "cpu_s": {name: round(value, 3) for name, value in best_cpu.items()},
        "cpu_ratio": round(cpu_ratio, 3),
        "same_positions": round(same_positions, 5),
        "peak_rss_mib": {name: round(value, 1) for name, value in rss.items()},
        "max_score_error": max_score_error,
        "index_data": {
            "clusters": args.clusters,
            "embeddings_from": args.embeddings_from,
            "ivf": {"nlist": args.nlist, "nprobe": args.nprobe},
            "hnsw": {"m": args.m, "ef_search": args.ef_search},
        },
        "indexes": compare_indexes(args, rng) if device.type == "cpu" and args.indexes else None,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
