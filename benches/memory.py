"""Memory benchmark: HNSW recall/QPS (faiss vs hnswlib), writeback insert throughput, graph expansion,
and the two memory backends side by side (SQLite + faiss vs PostgreSQL + pgvector).

    python benches/memory.py                 # N = 100k vectors per dataset
    python benches/memory.py --n 20000       # smaller, for a quick run
    python benches/memory.py --only backends --backend-n 100000   # only the backend comparison
                                             # (merged into the existing results files)

Backends: both stores are filled through ``MemoryBackend.insert_nodes`` in batches (the
service's write path, without similar-edge search, so insert time is the store's own), then
queried through ``MemoryService.search(k=10)`` one query at a time (what a request does:
ANN search plus reading the hit rows).  PostgreSQL is the pgserver wheel's (started here in a
temp dir on a Unix socket), or ``--dsn`` / ``RUVLLM_MEMORY_DSN``.  Both use the edge profile's
HNSW settings.

Datasets: (a) all-MiniLM-L6-v2 embeddings of generated sentences (cached under data/cache/),
(b) clustered synthetic 384-d unit vectors.  Ground truth is exact inner-product search
(faiss IndexFlatIP).  Settings are the profiles' memory sections: edge (M16, efC100, ef32) and
server-cpu (M32, efC200, ef64).  QPS is one query at a time on one thread (the service's access
pattern); build time uses all cores.  Writes benches/results/memory.{json,md}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import faiss  # noqa: E402

from ruvllm_lab.config import Config, EmbeddingConfig  # noqa: E402
from ruvllm_lab.memory import MemoryService, VectorIndex  # noqa: E402
from ruvllm_lab.memory.vectors import clustered_unit_vectors  # noqa: E402

RESULTS = ROOT / "benches" / "results"
CACHE = ROOT / "data" / "cache"
K = 10

SUBJECTS = ["The engineer", "A student", "My neighbour", "The doctor", "Our team", "The robot", "A chef",
            "The pilot", "The teacher", "An artist", "The farmer", "The startup", "A historian", "The lawyer"]
VERBS = ["explains", "repairs", "questions", "describes", "plans", "measures", "writes about", "studies",
         "sells", "paints", "debugs", "teaches", "forgets", "celebrates", "compares"]
OBJECTS = ["the database schema", "a broken bicycle", "the quarterly budget", "an old castle", "the weather",
           "a neural network", "the football match", "a recipe for bread", "the election results",
           "a jazz concert", "the tax rules", "a mountain trail", "the vaccine trial", "a chess opening",
           "the river flood", "a space launch", "the coffee harvest", "a memory leak", "the city budget"]
TAILS = ["before lunch", "in great detail", "for the third time", "with some doubts", "on Monday",
         "after the meeting", "to a friend", "for a podcast", "late at night", "using simple words"]


def generated_sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    parts = [rng.integers(0, len(x), n) for x in (SUBJECTS, VERBS, OBJECTS, TAILS)]
    return [f"{SUBJECTS[a]} {VERBS[b]} {OBJECTS[c]} {TAILS[d]} (note {i})." for i, (a, b, c, d) in
            enumerate(zip(*parts))]


def minilm_vectors(n: int) -> np.ndarray:
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"bench_minilm_{n}.npy"
    if path.exists():
        return np.load(path)
    from ruvllm_lab.embedding import EmbeddingService
    emb = EmbeddingService(EmbeddingConfig(batch_size=256, cache_size=0))
    t0 = time.perf_counter()
    vecs = emb.embed(generated_sentences(n))
    print(f"  embedded {n} sentences in {time.perf_counter() - t0:.1f} s", flush=True)
    np.save(path, vecs)
    return vecs


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) / exact.shape[1] for f, e in zip(found, exact)]))


def time_queries(search_one, queries: np.ndarray) -> tuple[np.ndarray, float]:
    out = np.zeros((len(queries), K), np.int64)
    t0 = time.perf_counter()
    for i, q in enumerate(queries):
        out[i] = search_one(q)
    return out, len(queries) / (time.perf_counter() - t0)


def bench_ann(name: str, base: np.ndarray, queries: np.ndarray, profiles: dict) -> list[dict]:
    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(base)
    exact = flat.search(queries, K)[1]
    ids = np.arange(len(base), dtype=np.int64)
    rows = []
    try:
        import hnswlib
    except ImportError as e:
        hnswlib = None
        print(f"  hnswlib unavailable: {e}", flush=True)
    for profile, mem in profiles.items():
        m, efc, ef = mem.hnsw_m, mem.hnsw_ef_construction, mem.hnsw_ef_search
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        t0 = time.perf_counter()
        index = VectorIndex(base.shape[1], m, efc, ef)
        index.add(ids, base)
        build = time.perf_counter() - t0
        faiss.omp_set_num_threads(1)
        found, qps = time_queries(lambda q: index.search(q[None, :], K)[1][0], queries)
        rows.append({"dataset": name, "profile": profile, "library": f"faiss {faiss.__version__}", "M": m,
                     "ef_construction": efc, "ef_search": ef, "n": len(base), "recall_at_10": recall(found, exact),
                     "qps": qps, "build_s": build})
        print(f"  {name} {profile} faiss: recall {rows[-1]['recall_at_10']:.4f} qps {qps:.0f} build {build:.1f}s", flush=True)
        del index
        if hnswlib is None:
            rows.append({"dataset": name, "profile": profile, "library": "hnswlib (not installed)", "M": m,
                         "ef_construction": efc, "ef_search": ef, "n": len(base), "recall_at_10": None,
                         "qps": None, "build_s": None})
            continue
        t0 = time.perf_counter()
        h = hnswlib.Index(space="ip", dim=base.shape[1])
        h.init_index(max_elements=len(base), M=m, ef_construction=efc, random_seed=0)
        h.set_num_threads(os.cpu_count() or 1)
        h.add_items(base, ids)
        build = time.perf_counter() - t0
        h.set_ef(ef)
        h.set_num_threads(1)
        found, qps = time_queries(lambda q: h.knn_query(q, k=K)[0][0], queries)
        rows.append({"dataset": name, "profile": profile, "library": "hnswlib", "M": m, "ef_construction": efc,
                     "ef_search": ef, "n": len(base), "recall_at_10": recall(found, exact), "qps": qps,
                     "build_s": build})
        print(f"  {name} {profile} hnswlib: recall {rows[-1]['recall_at_10']:.4f} qps {qps:.0f} build {build:.1f}s", flush=True)
        del h
    return rows


def bench_service(profile_cfg, n_insert: int, n_text: int) -> dict:
    """Writeback throughput (vectors given; and texts embedded by the worker), then search/expand latency."""
    faiss.omp_set_num_threads(1)
    vectors = clustered_unit_vectors(n_insert, 384, clusters=max(10, n_insert // 100), seed=11)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = profile_cfg.memory
        cfg.db_path = str(Path(tmp) / "memory.db")
        from ruvllm_lab.embedding import EmbeddingService
        emb = EmbeddingService(EmbeddingConfig(batch_size=64, cache_size=0))
        with MemoryService(cfg, 384, embedder=emb) as mem:
            t0 = time.perf_counter()
            for i, v in enumerate(vectors):
                mem.enqueue(f"synthetic memory {i}", vector=v)
            t_enqueue = time.perf_counter() - t0
            mem.flush()
            total = time.perf_counter() - t0
            out["writeback_vectors"] = {"n": n_insert, "inserts_per_s": n_insert / total,
                                        "enqueue_us_per_item": 1e6 * t_enqueue / n_insert,
                                        "batches": mem.stats()["writeback"]["batches"],
                                        "similar_edges_k": cfg.similar_edges_k}
            texts = generated_sentences(n_text, seed=7)
            emb.embed(["warm up the encoder"])
            t0 = time.perf_counter()
            for t in texts:
                mem.enqueue(t)
            mem.flush()
            total = time.perf_counter() - t0
            out["writeback_texts"] = {"n": n_text, "inserts_per_s": n_text / total}
            stats = mem.stats()
            out["store"] = {k: stats[k] for k in ("nodes", "edges", "index_bytes", "db_bytes")}

            rng = np.random.default_rng(0)
            probes = vectors[rng.integers(0, n_insert, 200)]
            lat_search, lat_expand = {}, {}
            for hops in (1, 2):
                s_ms, e_ms, sizes = [], [], []
                for q in probes:
                    t0 = time.perf_counter()
                    hits = mem.search(q, k=5)
                    t1 = time.perf_counter()
                    sg = mem.expand([h.node_id for h in hits], hops=hops, max_nodes=50,
                                    seed_scores={h.node_id: h.score for h in hits})
                    t2 = time.perf_counter()
                    s_ms.append(1e3 * (t1 - t0))
                    e_ms.append(1e3 * (t2 - t1))
                    sizes.append((len(sg), sg.num_edges))
                lat_search = {"p50_ms": float(np.percentile(s_ms, 50)), "p95_ms": float(np.percentile(s_ms, 95))}
                lat_expand[f"hops_{hops}"] = {"p50_ms": float(np.percentile(e_ms, 50)),
                                              "p95_ms": float(np.percentile(e_ms, 95)),
                                              "mean_nodes": float(np.mean([s[0] for s in sizes])),
                                              "mean_edges": float(np.mean([s[1] for s in sizes]))}
            out["search_k5"] = lat_search
            out["expand_max50"] = lat_expand
    return out


def bench_backends(n: int, n_queries: int, dsn: str | None) -> dict:
    """Fill each backend with the same `n` clustered 384-d vectors, then recall@10 and QPS of search."""
    from ruvllm_lab.memory.backend import open_backend
    from ruvllm_lab.memory.graph_store import NewNode

    faiss.omp_set_num_threads(1)
    data = clustered_unit_vectors(n + n_queries, 384, clusters=max(10, n // 500), seed=3)
    base, queries = data[:n], data[n:]
    flat = faiss.IndexFlatIP(384)
    flat.add(base)
    exact = flat.search(queries, K)[1]  # positions in `base`
    edge = Config.load(ROOT / "configs" / "edge.toml").memory
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        if "postgres" in BACKENDS_RUN:
            if dsn is None:
                import pgserver
                server = pgserver.get_server(Path(tmp) / "pg", cleanup_mode="delete")
                dsn = server.get_uri()
        try:
            for backend_name in BACKENDS_RUN:
                cfg = dataclasses.replace(edge, backend=backend_name, db_path=str(Path(tmp) / "memory.db"),
                                          dsn=dsn or "", pg_schema="bench_memory", similar_edges_k=0,
                                          max_nodes=max(edge.max_nodes, n + 1))
                backend = open_backend(cfg, 384)
                if backend_name == "postgres":
                    backend.drop()  # a clean schema, also on a user's server
                    backend.close()
                    backend = open_backend(cfg, 384)
                t0 = time.perf_counter()
                ids = []
                for start in range(0, n, 1000):
                    chunk = base[start:start + 1000]
                    ids += backend.insert_nodes([NewNode(f"node {start + i}", "document", v) for i, v in enumerate(chunk)])
                insert_s = time.perf_counter() - t0
                pos_to_id = np.asarray(ids, np.int64)
                with MemoryService(cfg, 384, backend=backend) as mem:
                    mem.search(queries[0], k=K)  # warm the connection / caches
                    found, qps = time_queries(lambda q: ([h.node_id for h in mem.search(q, k=K)] + [-1] * K)[:K],
                                              queries)
                    stats = mem.stats()
                    if backend_name == "postgres":
                        backend.drop()
                rec = recall(found, pos_to_id[exact])
                rows.append({"backend": backend_name, "n": n, "queries": n_queries, "M": cfg.hnsw_m,
                             "ef_construction": cfg.hnsw_ef_construction, "ef_search": cfg.hnsw_ef_search,
                             "recall_at_10": rec, "qps": qps, "insert_per_s": n / insert_s, "insert_s": insert_s,
                             "index_bytes": stats["index_bytes"], "db_bytes": stats["db_bytes"]})
                print(f"  {backend_name}: n {n} recall@10 {rec:.4f} qps {qps:.0f} inserts/s {n / insert_s:.0f}", flush=True)
        finally:
            if server is not None:
                server.cleanup()
    return {"dataset": f"synthetic clustered 384-d unit vectors ({max(10, n // 500)} clusters, seed 3)",
            "rows": rows}


BACKENDS_RUN = ("sqlite", "postgres")


def markdown_backends(b: dict) -> list[str]:
    lines = ["", "## Memory backends side by side (edge profile HNSW settings, MemoryService.search k=10, 1 thread)", "",
             f"Data: {b['dataset']}; recall@10 against exact inner-product search; QPS one query at a time "
             f"({b['rows'][0]['queries'] if b['rows'] else 0} queries), including reading the hit rows.", "",
             "| backend | N | M | efC | ef | recall@10 | QPS | inserts/s (batches of 1000) | index MB | store MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in b["rows"]:
        lines.append(f"| {r['backend']} | {r['n']} | {r['M']} | {r['ef_construction']} | {r['ef_search']} | "
                     f"{r['recall_at_10']:.4f} | {r['qps']:.0f} | {r['insert_per_s']:.0f} | "
                     f"{r['index_bytes'] / 1e6:.1f} | {r['db_bytes'] / 1e6:.1f} |")
    return lines


def markdown(report: dict) -> str:
    lines = [f"# Memory benchmark ({report['timestamp']})", "",
             f"Machine: {report['machine']}; command: `{report['command']}`", "",
             f"## ANN recall@{K} vs exact IndexFlatIP, QPS one query at a time on 1 thread", "",
             "| dataset | profile | library | M | efC | ef | N | recall@10 | QPS | build s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["ann"]:
        rec = "n/a" if r["recall_at_10"] is None else f"{r['recall_at_10']:.4f}"
        qps = "n/a" if r["qps"] is None else f"{r['qps']:.0f}"
        build = "n/a" if r["build_s"] is None else f"{r['build_s']:.1f}"
        lines.append(f"| {r['dataset']} | {r['profile']} | {r['library']} | {r['M']} | {r['ef_construction']} | "
                     f"{r['ef_search']} | {r['n']} | {rec} | {qps} | {build} |")
    s = report["service"]
    wv, wt = s["writeback_vectors"], s["writeback_texts"]
    lines += ["", "## MemoryService (edge profile, writeback queue, SQLite WAL + faiss)", "",
              "| measure | value |", "|---|---|",
              f"| writeback inserts/s, vectors given ({wv['n']} items, {wv['batches']} batches, "
              f"similar_edges_k={wv['similar_edges_k']}) | {wv['inserts_per_s']:.0f} |",
              f"| enqueue cost per item | {wv['enqueue_us_per_item']:.1f} us |",
              f"| writeback inserts/s, texts embedded by the worker (MiniLM, {wt['n']} items) | {wt['inserts_per_s']:.0f} |",
              f"| search k=5 p50 / p95 | {s['search_k5']['p50_ms']:.2f} / {s['search_k5']['p95_ms']:.2f} ms |"]
    for hops, e in s["expand_max50"].items():
        lines.append(f"| expand {hops.replace('_', '=')} max_nodes=50 p50 / p95 | {e['p50_ms']:.2f} / {e['p95_ms']:.2f} ms "
                     f"(mean {e['mean_nodes']:.1f} nodes, {e['mean_edges']:.1f} edges) |")
    st = s["store"]
    lines.append(f"| store after the run | {st['nodes']} nodes, {st['edges']} edges, index ~{st['index_bytes'] / 1e6:.1f} MB, "
                 f"db {st['db_bytes'] / 1e6:.1f} MB |")
    if "backends" in report:
        lines += markdown_backends(report["backends"])
        lines.append(f"\nBackends command: `{report['backends']['command']}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="vectors per ANN dataset")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--inserts", type=int, default=10_000, help="vectors through the writeback queue")
    ap.add_argument("--texts", type=int, default=1000, help="texts embedded through the writeback queue")
    ap.add_argument("--datasets", default="minilm,synthetic")
    ap.add_argument("--only", choices=("all", "backends"), default="all")
    ap.add_argument("--backend-n", type=int, default=100_000, help="nodes per backend in the backend comparison")
    ap.add_argument("--dsn", default=os.environ.get("RUVLLM_MEMORY_DSN"),
                    help="PostgreSQL for the backend comparison (default: a pgserver started here)")
    args = ap.parse_args()
    command = "python benches/memory.py " + " ".join(sys.argv[1:])
    print(f"backends: {args.backend_n} nodes each, {args.queries} queries", flush=True)
    backends = {**bench_backends(args.backend_n, args.queries, args.dsn), "command": command}
    if args.only == "backends":  # merge into the last full run's results
        report = json.loads((RESULTS / "memory.json").read_text())
        report["backends"] = backends
        (RESULTS / "memory.json").write_text(json.dumps(report, indent=2))
        md = markdown(report)
        (RESULTS / "memory.md").write_text(md)
        print(md)
        return

    profiles = {p: Config.load(ROOT / "configs" / f"{p}.toml").memory for p in ("edge", "server-cpu")}
    rows = []
    for name in args.datasets.split(","):
        print(f"dataset {name}: {args.n} + {args.queries} vectors", flush=True)
        if name == "minilm":
            data = minilm_vectors(args.n + args.queries)
            rng = np.random.default_rng(1)
            data = data[rng.permutation(len(data))]
        elif name == "synthetic":
            data = clustered_unit_vectors(args.n + args.queries, 384, clusters=max(10, args.n // 500), seed=2)
        else:
            raise SystemExit(f"unknown dataset {name!r}; use minilm, synthetic")
        rows += bench_ann(name, np.ascontiguousarray(data[:args.n]), np.ascontiguousarray(data[args.n:]), profiles)
    print("service: writeback, search, expand", flush=True)
    service = bench_service(Config.load(ROOT / "configs" / "edge.toml"), args.inserts, args.texts)
    report = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": "python benches/memory.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "ann": rows,
        "service": service,
        "backends": backends,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (RESULTS / "memory.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
