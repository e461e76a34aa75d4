"""Router and graph-attention benchmark.

Measures, on this machine:
  * routing decision latency at batch 1 (p50 / p99 µs): the network alone through torch and
    through the plain-numpy path, and the full ``route()`` call (featurise + network + decision
    rules) with each backend;
  * model size (parameters, non-zeros, KB float32 / int8) after three-phase training at
    sparsity 0, 0.9 and 0.95, with held-out accuracy on the synthetic task; sizes follow EdgeML
    (``router.train.edgeml_size_bytes``: a sparse cell matrix is charged value + index per
    non-zero, every other tensor dense);
  * graph-attention ranking latency on 50-node subgraphs (similarity default and trained GATv2).

Target: decision p50 <= 50 µs.  Prints a markdown table and writes
``benches/results/router.{json,md}``.  Run:  ``flock /tmp/ruvllm-heavy.lock .venv/bin/python benches/router.py``
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ruvllm_lab.attention import GraphAttentionEngine  # noqa: E402
from ruvllm_lab.config import AttentionConfig, Config, RouterConfig  # noqa: E402
from ruvllm_lab.graph import EDGE_TYPES, NODE_KINDS, Subgraph  # noqa: E402
from ruvllm_lab.router import (FastGRNNPolicy, NumpyFastGRNN, RouterExample, RouterInput, accuracy,  # noqa: E402
                               featurise_input, make_router)

TIERS = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
TARGET_P50_US = 50.0


def percentiles_us(samples_ns: list[int]) -> dict:
    a = np.asarray(samples_ns, np.float64) / 1e3
    return {"p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99)),
            "mean_us": float(a.mean()), "n": int(len(a))}


def time_calls(fn, n: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return percentiles_us(samples)


def synthetic_examples(n: int, dim: int, seed: int) -> list[RouterExample]:
    """Topic cluster -> tier, except a strong memory hit makes the smallest tier enough."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(1234).normal(size=(len(TIERS), dim))
    out = []
    for _ in range(n):
        c = int(rng.integers(len(TIERS)))
        v = centers[c] + 0.5 * rng.normal(size=dim)
        sim = float(rng.choice([rng.uniform(0.0, 0.55), rng.uniform(0.8, 1.0)]))
        x = RouterInput((v / np.linalg.norm(v)).astype(np.float32), int(rng.integers(5, 200)), sim,
                        int(rng.integers(0, 8)), float(rng.uniform(0, 4)), int(rng.integers(0, 5)),
                        {t: float(rng.uniform(0.5, 1.0)) for t in TIERS}, None, None)
        out.append(RouterExample(x, TIERS[0] if sim > 0.7 else TIERS[c], context_items=int(rng.choice([0, 2, 4, 8])),
                                 temperature=0.7, top_p=0.9))
    return out


def subgraph_50(dim: int, rng: np.random.Generator) -> tuple[np.ndarray, Subgraph]:
    n, e = 50, 120
    vecs = rng.normal(size=(n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    q = rng.normal(size=dim).astype(np.float32)
    q /= np.linalg.norm(q)
    hops = np.array([0] * 10 + [1] * 40)
    sg = Subgraph(node_ids=list(range(n)), texts=[f"memory {i}" for i in range(n)],
                  kinds=[NODE_KINDS[i % len(NODE_KINDS)] for i in range(n)], vectors=vecs,
                  seed_scores=np.where(hops == 0, vecs @ q, 0).astype(np.float32), hops=hops,
                  use_counts=rng.integers(0, 20, n), ages_s=rng.uniform(0, 1e6, n).astype(np.float32),
                  quality=rng.uniform(0, 1, n).astype(np.float32), edge_index=rng.integers(0, n, (2, e)),
                  edge_weight=rng.uniform(0, 1, e).astype(np.float32),
                  edge_type=rng.integers(0, len(EDGE_TYPES), e), edge_age_s=rng.uniform(0, 1e6, e).astype(np.float32),
                  edge_use_count=rng.integers(0, 10, e).astype(np.float32))
    return q, sg


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "edge.toml"))
    ap.add_argument("--n", type=int, default=5000, help="timed calls per latency row")
    ap.add_argument("--examples", type=int, default=1000, help="synthetic training examples")
    args = ap.parse_args()
    torch.set_num_threads(1)  # batch-1 latency: one thread avoids pool wake-ups on a shared box
    cfg = Config.load(args.config)
    dim = cfg.embedding.dimension
    rcfg = cfg.router
    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                 "python": platform.python_version(), "torch": torch.__version__,
                                 "torch_threads": torch.get_num_threads()},
                     "config": {"profile": Path(args.config).name, "input_dim": dim, "hidden_dim": rcfg.hidden_dim,
                                "w_rank": rcfg.w_rank, "u_rank": rcfg.u_rank, "tiers": TIERS},
                     "target_p50_us": TARGET_P50_US}

    # ---- size at three sparsities (three-phase training on the synthetic task) --------------------
    train = synthetic_examples(args.examples, dim, seed=0)
    held_out = synthetic_examples(500, dim, seed=1)
    sizes, policies = [], {}
    for sparsity in (0.0, 0.9, 0.95):
        rc = RouterConfig(**{**rcfg.__dict__, "sparsity": sparsity})
        policy = make_router("fastgrnn", TIERS, rc, dim, seed=0)
        t0 = time.perf_counter()
        rep = policy.fit(train)
        fit_s = time.perf_counter() - t0
        acc = accuracy(policy.model, policy.featurise(held_out))
        sizes.append({"sparsity": sparsity, "param_count": rep["param_count"], "nonzeros": rep["nonzeros"],
                      "size_kb_float32": rep["size_kb_float32"], "size_kb_int8": rep["size_kb_int8"],
                      "size_kb_float32_dense": rep["size_kb_float32_dense"],
                      "cell_matrix_sparsity": rep["cell_matrix_sparsity"], "held_out_accuracy": acc,
                      "fit_seconds": fit_s})
        policies[sparsity] = policy
    results["size"] = sizes

    # ---- decision latency at batch 1 ---------------------------------------------------------------
    policy: FastGRNNPolicy = policies[rcfg.sparsity if rcfg.sparsity in policies else 0.95]
    x = held_out[0].x
    feats = featurise_input(x, TIERS, dim)
    h = np.zeros(policy.model.hidden_dim, np.float32)
    fx, fh = torch.from_numpy(feats)[None], torch.from_numpy(h)[None]
    fast = NumpyFastGRNN.from_model(policy.model)
    model = policy.model.eval()

    def torch_forward():
        with torch.inference_mode():
            model(fx, fh)

    torch_policy = FastGRNNPolicy(TIERS, policy.config, dim, backend="torch")
    torch_policy.load_state_dict(policy.state_dict())
    state = policy.route(x).state
    rows = {
        "network, torch (inference_mode)": time_calls(torch_forward, args.n, 200),
        "network, numpy": time_calls(lambda: fast.step(feats, h), args.n, 200),
        "featurise (RouterInput -> vector)": time_calls(lambda: featurise_input(x, TIERS, dim), args.n, 200),
        "route(), numpy backend (default)": time_calls(lambda: policy.route(x, state), args.n, 200),
        "route(), torch backend": time_calls(lambda: torch_policy.route(x, state), args.n, 200),
    }
    results["latency"] = [{"path": k, **v} for k, v in rows.items()]
    default_p50 = rows["route(), numpy backend (default)"]["p50_us"]
    results["decision_p50_us"] = default_p50
    results["meets_target"] = default_p50 <= TARGET_P50_US

    # ---- attention ranking on 50-node subgraphs -----------------------------------------------------
    rng = np.random.default_rng(0)
    graphs = [subgraph_50(dim, rng) for _ in range(20)]
    acfg: AttentionConfig = cfg.attention
    untrained = GraphAttentionEngine(acfg, dim, seed=0)
    trained = GraphAttentionEngine(acfg, dim, seed=0)
    trained.fit([(q, sg, [int(np.argmax(sg.quality))]) for q, sg in graphs], epochs=2)
    attn = []
    for name, eng in (("similarity (untrained default)", untrained), ("gatv2 (trained)", trained)):
        i = iter(range(10 ** 9))
        attn.append({"method": name, "nodes": 50,
                     **time_calls(lambda: eng.rank(*graphs[next(i) % len(graphs)]), max(200, args.n // 10), 20)})
    results["attention"] = attn
    results["attention_config"] = {"heads": acfg.heads, "hidden_dim": acfg.hidden_dim, "concat_heads": acfg.concat_heads}

    md = render_markdown(results)
    out_dir = ROOT / "benches" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "router.json").write_text(json.dumps(results, indent=2))
    (out_dir / "router.md").write_text(md)
    print(md)
    return results


def render_markdown(r: dict) -> str:
    m, c = r["machine"], r["config"]
    lines = [
        "# Router and graph-attention benchmark", "",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} thread), "
        f"Python {m['python']}.  Profile `{c['profile']}`: input_dim {c['input_dim']}, hidden {c['hidden_dim']}, "
        f"w_rank {c['w_rank']}, u_rank {c['u_rank']}, {len(c['tiers'])} tiers.", "",
        f"## Decision latency, batch 1 (target p50 <= {r['target_p50_us']:.0f} µs: "
        f"{'met' if r['meets_target'] else 'NOT met'}, route() p50 = {r['decision_p50_us']:.1f} µs)", "",
        "| path | p50 µs | p99 µs | mean µs | calls |", "|---|---:|---:|---:|---:|",
    ]
    for row in r["latency"]:
        lines.append(f"| {row['path']} | {row['p50_us']:.1f} | {row['p99_us']:.1f} | {row['mean_us']:.1f} | {row['n']} |")
    lines += ["", "## Model size after three-phase training (synthetic 4-tier task)", "",
              "| sparsity | params | non-zeros | KB float32 | KB int8 | KB dense float32 | cell sparsity | held-out acc |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in r["size"]:
        lines.append(f"| {s['sparsity']:.2f} | {s['param_count']} | {s['nonzeros']} | {s['size_kb_float32']:.2f} | "
                     f"{s['size_kb_int8']:.2f} | {s['size_kb_float32_dense']:.2f} | {s['cell_matrix_sparsity']:.3f} | "
                     f"{s['held_out_accuracy']:.3f} |")
    lines += ["", "KB = 1024 bytes, EdgeML's convention (`utils.estimateNNZ`): a cell matrix below density 0.5 is "
              "stored sparse at value + index per non-zero (float32: 4 + 4 bytes; int8: 1 + 2 bytes), every other "
              "tensor dense; int8 adds one float32 scale per tensor.", "",
              f"## Graph-attention ranking, 50-node subgraphs (heads {r['attention_config']['heads']}, hidden "
              f"{r['attention_config']['hidden_dim']}, concat {r['attention_config']['concat_heads']})", "",
              "| method | p50 µs | p99 µs | mean µs | calls |", "|---|---:|---:|---:|---:|"]
    for a in r["attention"]:
        lines.append(f"| {a['method']} | {a['p50_us']:.1f} | {a['p99_us']:.1f} | {a['mean_us']:.1f} | {a['n']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
