"""Write notebooks/00_quickstart .. 03_compression with nbformat (run: python experiments/make_notebooks.py).

Every notebook: first cell tagged ``parameters`` (papermill overrides it; the defaults are
small), the rest only calls ``ruvllm_lab`` and plots, and each logs one MLflow run through
``MLflowTracker`` (experiment name is a parameter; tracking URI from ``MLFLOW_TRACKING_URI``,
default ``sqlite:///<repo>/mlruns/mlflow.db``).  Relative paths resolve against the repo root,
so papermill may run a notebook from any working directory.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"

SETUP = '''\
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from pathlib import Path
from IPython.display import display, Markdown
from ruvllm_lab.config import Config
from ruvllm_lab import workloads
from ruvllm_lab.experiments.tracking import MLflowTracker, PROJECT_ROOT

def project_path(p):
    p = Path(p)
    return p if p.is_absolute() else PROJECT_ROOT / p
'''


def end_run_cell(before: str = "", after: str = ""):
    """The last cell of every notebook: end the MLflow run and say where it is."""
    return new_code_cell(before + 'tracker.end()\n'
                         'print(f"MLflow run {tracker.run_id} in experiment {experiment_name!r} at {tracker.tracking_uri}")\n'
                         + after)


def params_cell(source: str):
    cell = new_code_cell(source)
    cell.metadata["tags"] = ["parameters"]
    return cell


def notebook(cells) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


QUICKSTART = notebook([
    params_cell('''\
# Parameters (papermill overrides these)
config_path = "configs/edge.toml"   # relative paths resolve against the repo root
# data_dir "" = a fresh temporary directory for memory and learned state
data_dir = ""
question = "What is the capital of France?"
follow_up = "What is the capital of Australia?"
correction = "The capital of Australia is Canberra."
max_tokens = 32
experiment_name = "ruvllm-quickstart"
run_name = ""
'''),
    new_markdown_cell("# RuvLLM quickstart\nBuild the system, ask, rate, correct, and look at the memory graph."),
    new_code_cell(SETUP + '''\
import tempfile
from ruvllm_lab.orchestrator import RuvLLM
from ruvllm_lab.types import Feedback, Request, Constraints
from ruvllm_lab.experiments.tracking import log_config

work = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="ruvllm-quickstart-"))
cfg = Config.load(project_path(config_path), overrides={
    "memory.db_path": str(work / "memory.db"), "system.data_dir": str(work / "state"),
    "inference.max_tokens": max_tokens})
tracker = MLflowTracker(experiment=experiment_name, run_name=run_name or None, tags={"notebook": "00_quickstart"})
log_config(tracker, cfg)
llm = RuvLLM(cfg)
print("tiers:", llm.pool.tiers, "| memory nodes:", llm.memory.count())
'''),
    new_markdown_cell("## Ask"),
    new_code_cell('''\
r1 = llm.query_with(Request(query=question, constraints=Constraints(temperature=0.0)))
print(r1.text)
display(r1.routing_info)
print("latency per stage (ms):", {k: round(v, 1) for k, v in r1.latency_ms.items()})
tracker.log_metrics({"first/latency_ms": r1.latency_ms.get("total", 0.0), "first/confidence": r1.confidence})
'''),
    new_markdown_cell("## Rate and correct\nA rating re-scores the answer for the router; a correction becomes a `correction` node in memory."),
    new_code_cell('''\
fb1 = llm.feedback(Feedback(request_id=r1.request_id, rating=5))
r2 = llm.query_with(Request(query=follow_up, constraints=Constraints(temperature=0.0)))
print("answer:", r2.text)
fb2 = llm.feedback(Feedback(request_id=r2.request_id, rating=1, correction=correction))
print(fb1, fb2, sep="\\n")
r3 = llm.query_with(Request(query=follow_up, constraints=Constraints(temperature=0.0)))
print("after the correction:", r3.text)
print("sources:", [(s.kind, s.text[:60]) for s in r3.sources])
tracker.log_metrics({"feedback/recorded": float(fb1["recorded"] and fb2["recorded"]),
                     "correction/used_as_source": float(any(s.kind == "correction" for s in r3.sources))})
'''),
    new_markdown_cell("## Learn and look at the memory graph"),
    new_code_cell('''\
import numpy as np
import matplotlib.pyplot as plt
report = llm.learn()
print("learning cycle:", {k: v for k, v in report.items() if isinstance(v, (int, float, str, bool))})
stats = llm.memory.stats()
print("memory:", {k: stats[k] for k in ("nodes", "edges", "nodes_by_kind", "edges_by_type")})
tracker.log_metrics({"memory/nodes": stats["nodes"], "memory/edges": stats["edges"]})

nodes = llm.memory.nodes()
ids = [n.id for n in nodes]
vecs = np.stack([llm.memory.vector(i) for i in ids]) if ids else np.zeros((0, cfg.embedding.dimension))
if len(ids) >= 2:   # 2-D layout: the two principal directions of the node embeddings
    centred = vecs - vecs.mean(0)
    xy = centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T
else:
    xy = np.zeros((len(ids), 2))
pos = {i: xy[k] for k, i in enumerate(ids)}
colours = {"interaction": "tab:blue", "correction": "tab:red", "document": "tab:green", "concept": "tab:purple"}
fig, ax = plt.subplots(figsize=(6, 4.5))
for e in llm.memory.edges():
    if e.src in pos and e.dst in pos:
        ax.plot(*zip(pos[e.src], pos[e.dst]), color="grey", lw=0.5 + 2 * e.weight, alpha=0.6)
for n in nodes:
    ax.scatter(*pos[n.id], color=colours.get(n.kind, "black"), s=60, zorder=3)
    ax.annotate(n.text[:28], pos[n.id], fontsize=7, xytext=(4, 4), textcoords="offset points")
ax.set_title("memory graph (PCA of node embeddings; edge width = weight)")
fig.tight_layout()
tracker.log_figure(fig, "memory_graph.png")
'''),
    new_markdown_cell("## Interactive panel\nType a question, press *Ask*, then rate it. (Callbacks run only on clicks, so headless runs pass straight through.)"),
    new_code_cell('''\
import ipywidgets as widgets
box = widgets.Text(placeholder="Ask something", layout=widgets.Layout(width="60%"))
ask = widgets.Button(description="Ask")
stars = widgets.IntSlider(value=5, min=1, max=5, description="Rating")
rate = widgets.Button(description="Rate")
fix = widgets.Text(placeholder="Correction (optional)")
out = widgets.Output()
last = {}

def on_ask(_):
    with out:
        r = llm.query(box.value)
        last["id"] = r.request_id
        print(f"[{r.routing_info.get('tier')}] {r.text}")

def on_rate(_):
    with out:
        if "id" in last:
            print(llm.feedback(Feedback(request_id=last["id"], rating=stars.value, correction=fix.value or None)))

ask.on_click(on_ask)
rate.on_click(on_rate)
display(widgets.VBox([widgets.HBox([box, ask]), widgets.HBox([stars, fix, rate]), out]))
'''),
    end_run_cell(before="# Headless runs (papermill) end the MLflow run here; in JupyterLab keep using the panel "
                        "above, then run this cell.\n"),
])

ROUTING = notebook([
    params_cell('''\
# Parameters (papermill overrides these); small defaults finish in about two minutes on 2 cores
config_path = "configs/edge.toml"
overrides = {}
tiers = ["smollm2-135m", "qwen2.5-coder-0.5b"]
families = ["arithmetic", "units", "string", "date", "factual"]
n_queries = 30
seed = 0
max_tokens = 24
routers = ["fastgrnn", "knn", "logreg", "random", "always-smallest", "always-largest", "oracle"]
update_every = 8
# cache_dir "" = data/cache/outcomes (shared by every run and sweep)
cache_dir = ""
experiment_name = "ruvllm-routing"
run_name = ""
'''),
    new_markdown_cell("# Routing: learned router vs baselines\nEvery tier answers every query once (cached); the routers learn online from the outcomes. "
                      "Metrics: quality, parameter-weighted cost, latency, cost reduction vs always-largest, RouteLLM APGR / CPT."),
    new_code_cell(SETUP + '''\
from ruvllm_lab.experiments import routing

cfg = Config.load(project_path(config_path), overrides={**overrides, "inference.models": list(tiers)})
items = workloads.generate(families, n_queries, seed)
tracker = MLflowTracker(experiment=experiment_name, run_name=run_name or None, tags={"notebook": "01_routing"})
result = routing.run(cfg, items, routers, tiers=tiers, max_tokens=max_tokens, update_every=update_every, seed=seed,
                     cache_dir=project_path(cache_dir) if cache_dir else None, tracker=tracker)
print(f"{len(items)} queries, {result.outcomes.generated} new generations (the rest from the cache)")
'''),
    new_markdown_cell("## Each tier alone"),
    new_code_cell('display(result.tiers.round(3))'),
    new_markdown_cell("## Routers"),
    new_code_cell('display(Markdown(result.to_markdown()))'),
    new_code_cell('result.figures["cost_quality"]'),
    new_code_cell('result.figures["online_quality"]'),
    end_run_cell(after='print(f"cost-quality figure: {tracker.artifact_uri}/cost_quality.png")\n'),
])

FORGETTING = notebook([
    params_cell('''\
# Parameters (papermill overrides these)
config_path = "configs/edge.toml"
overrides = {}
phases = [{"arithmetic": 1.0, "units": 0.5}, {"string": 1.0}, {"factual": 1.0, "date": 0.25}]
n_per_phase = 60
methods = ["naive", "ewc", "replay", "ewc+replay"]
ewc_lambda = 10000.0
buffer_size = 200
epochs_per_phase = 40
labels = "synthetic"    # or "outcomes": cheapest correct tier from the cached routing outcomes (runs the LLMs)
tiers = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]
seed = 0
experiment_name = "ruvllm-forgetting"
run_name = ""
'''),
    new_markdown_cell("# Forgetting: naive vs EWC vs replay vs EWC + replay\nThe FastGRNN router learns phases of a shifting workload; the accuracy matrix gives F, BWT and forgetting per 10K updates."),
    new_code_cell(SETUP + '''\
from ruvllm_lab.experiments import forgetting

cfg = Config.load(project_path(config_path), overrides=overrides)
schedule = workloads.shift_schedule(phases, n_per_phase, seed)
tracker = MLflowTracker(experiment=experiment_name, run_name=run_name or None, tags={"notebook": "02_forgetting"})
result = forgetting.run(cfg, schedule, methods, ewc_lambda=ewc_lambda, buffer_size=buffer_size, tiers=tiers,
                        labels=labels, epochs_per_phase=epochs_per_phase, seed=seed, tracker=tracker)
display(Markdown(result.to_markdown()))
'''),
    new_code_cell('''\
for method, matrix in result.matrices.items():
    display(Markdown(f"**{method}** (rows: after training phase i; columns: accuracy on phase j)"))
    display(matrix.round(3))
'''),
    new_code_cell('result.figures["accuracy_over_time"]'),
    new_code_cell('result.figures["forgetting_summary"]'),
    end_run_cell(),
])

COMPRESSION = notebook([
    params_cell('''\
# Parameters (papermill overrides these)
config_path = "configs/edge.toml"
overrides = {}
n_interactions = 40
cluster_counts = [2, 4, 8]
depths = [1, 2]
n_eval = 8
k = 5
answer_quality = True
seed = 0
experiment_name = "ruvllm-compression"
run_name = ""
'''),
    new_markdown_cell("# Compression: ratio vs recall and answer quality\nA memory of N interactions is compressed into concept nodes at several cluster counts and depths."),
    new_code_cell(SETUP + '''\
from ruvllm_lab.experiments import compression

cfg = Config.load(project_path(config_path), overrides=overrides)
tracker = MLflowTracker(experiment=experiment_name, run_name=run_name or None, tags={"notebook": "03_compression"})
result = compression.run(cfg, n_interactions, cluster_counts, depths, n_eval=n_eval, k=k,
                         answer_quality=answer_quality, seed=seed, tracker=tracker)
display(Markdown(result.to_markdown()))
'''),
    new_code_cell('result.figures["ratio_recall"]'),
    end_run_cell(),
])

NOTEBOOKS = {"00_quickstart.ipynb": QUICKSTART, "01_routing.ipynb": ROUTING, "02_forgetting.ipynb": FORGETTING,
             "03_compression.ipynb": COMPRESSION}


def main() -> None:
    NB_DIR.mkdir(exist_ok=True)
    for name, nb in NOTEBOOKS.items():
        for i, cell in enumerate(nb.cells):  # stable ids: regenerating an unchanged notebook changes no byte
            cell.id = f"{Path(name).stem[:2]}-cell-{i:02d}"
        nbformat.validate(nb)
        nbformat.write(nb, NB_DIR / name)
        print("wrote", NB_DIR / name)


if __name__ == "__main__":
    main()
