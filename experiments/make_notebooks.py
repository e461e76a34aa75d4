"""Write notebooks/00_quickstart .. 04_results with nbformat (run: python experiments/make_notebooks.py).

Every notebook: first cell tagged ``parameters`` (papermill overrides it; the defaults are
small), the rest only calls ``ruvllm_lab`` and plots.  00-03 each log one MLflow run
(``runner.open_notebook_run``: experiment name is a parameter, readable run name, FAILED when
a cell raises; tracking URI from ``MLFLOW_TRACKING_URI``, default
``sqlite:///<repo>/mlruns/mlflow.db``); 04 reads those runs back and compares them.
Relative paths resolve against the repo root, so papermill may run a notebook from any
working directory.

List and dict parameters also accept JSON text (``papermill ... -p methods '["naive","ewc"]'``):
the setup cell passes them through ``runner.json_param`` (added here for every list/dict in
the parameters cell).  The notebooks are bound to the ``ruvllm-lab`` kernel (``make venv``
installs it) and saved without outputs; figures are created with interactive mode off and shown
once, by the cell that displays them.
"""
from __future__ import annotations

import ast
import sys
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
from ruvllm_lab.experiments.tracking import PROJECT_ROOT
from ruvllm_lab.experiments.runner import json_param, open_notebook_run
import matplotlib.pyplot as plt
plt.ioff()  # a figure appears once: where a cell displays it, not also when a function creates it

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


KERNELSPEC = {"name": "ruvllm-lab", "display_name": "RuvLLM lab (.venv)", "language": "python"}
# what ipykernel reports, so JupyterLab finds nothing to update (and nothing to save) on open
LANGUAGE_INFO = {"codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py",
                 "mimetype": "text/x-python", "name": "python", "nbconvert_exporter": "python",
                 "pygments_lexer": "ipython3", "version": f"{sys.version_info.major}.{sys.version_info.minor}"}


def json_coercions(params_source: str) -> str:
    """``name = json_param(name, "name", list)`` for every list/dict literal in a parameters cell."""
    lines = []
    for node in ast.parse(params_source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            kind = {ast.List: "list", ast.Dict: "dict"}.get(type(node.value))
            if kind:
                name = node.targets[0].id
                lines.append(f'{name} = json_param({name}, "{name}", {kind})')
    if not lines:
        return ""
    return "# papermill -p passes text: JSON lists/dicts become values\n" + "\n".join(lines) + "\n\n"


def notebook(cells) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = dict(LANGUAGE_INFO)
    params = cells[0].source if cells and "parameters" in cells[0].metadata.get("tags", []) else ""
    coerce = json_coercions(params) if params else ""
    for cell in cells:  # right after the setup block, before anything uses a parameter
        if cell.cell_type == "code" and cell.source.startswith(SETUP):
            body = cell.source[len(SETUP):]
            # the experiment's figures are shown once, by the cells that display them
            close = "" if "plt.close(" in body else 'plt.close("all")  # figures show once, where a cell displays them\n'
            cell.source = SETUP + coerce + body + close
            break
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
run_tags = {}       # extra MLflow tags (the sweep adds a launch id)
experiment_name = "ruvllm-quickstart"
run_name = ""
'''),
    new_markdown_cell("# RuvLLM quickstart\nBuild the system, ask, rate, correct, and look at the memory graph."),
    new_code_cell(SETUP + '''\
import tempfile
from ruvllm_lab.orchestrator import RuvLLM
from ruvllm_lab.types import Feedback, Request, Constraints
from ruvllm_lab.experiments.tracking import log_experiment

work = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="ruvllm-quickstart-"))
cfg = Config.load(project_path(config_path), overrides={
    "memory.db_path": str(work / "memory.db"), "system.data_dir": str(work / "state"),
    "inference.max_tokens": max_tokens})
tracker = open_notebook_run("00_quickstart", experiment_name, run_name, run_tags)
log_experiment(tracker, cfg, {"experiment": "quickstart", "config_path": config_path, "question": question,
                              "follow_up": follow_up, "correction": correction, "max_tokens": max_tokens})
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
# a question and its correction embed almost alike: nudge coincident nodes apart so both show
span = float(np.ptp(xy, axis=0).max()) if len(ids) > 1 else 1.0
for a in range(len(ids)):
    for b in range(a):
        if np.linalg.norm(xy[a] - xy[b]) < 0.06 * (span or 1.0):
            xy[a] += np.array([0.0, 0.08 * (span or 1.0)])
pos = {i: xy[k] for k, i in enumerate(ids)}
colours = {"interaction": "tab:blue", "correction": "tab:red", "document": "tab:green", "concept": "tab:purple"}
fig, ax = plt.subplots(figsize=(7.5, 5))
styles = {}
for e in llm.memory.edges():
    if e.src in pos and e.dst in pos:
        ls = styles.setdefault(e.type, ["-", "--", ":", "-."][len(styles) % 4])
        ax.plot(*zip(pos[e.src], pos[e.dst]), color="grey", ls=ls, lw=0.5 + 2 * e.weight, alpha=0.6, zorder=1)
for kind in dict.fromkeys(n.kind for n in nodes):
    pts = np.array([pos[n.id] for n in nodes if n.kind == kind])
    ax.scatter(pts[:, 0], pts[:, 1], color=colours.get(kind, "black"), s=70, zorder=3, edgecolor="white",
               label=f"{kind} node")
for etype, ls in styles.items():
    ax.plot([], [], color="grey", ls=ls, label=f"{etype} edge (width = weight)")
mid = float(np.median(xy[:, 0])) if len(ids) else 0.0
for n in nodes:   # labels point inward, so none is cut at the frame
    left = pos[n.id][0] > mid
    ax.annotate(n.text[:32] + ("…" if len(n.text) > 32 else ""), pos[n.id], fontsize=7,
                xytext=(-6 if left else 6, 5), textcoords="offset points", ha="right" if left else "left")
ax.margins(x=0.45, y=0.25)
ax.set_xlabel("principal component 1 of the node embeddings")
ax.set_ylabel("principal component 2")
ax.set_title("Memory graph after the session")
ax.legend(fontsize=7, loc="best", framealpha=0.85)
fig.tight_layout()
tracker.log_figure(fig, "memory_graph.png")
display(fig)
plt.close(fig)  # shown once, here
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
# Parameters (papermill overrides these).  Defaults = the README's run (issue 13: every tier of the profile,
# >= 200 distinct queries, >= 5 seeds): the first run generates the outcomes (~10 min on 2 cores, cached),
# later runs take minutes.  Smaller runs work and are flagged underpowered.
config_path = "configs/server-cpu.toml"
overrides = {}
tiers = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
families = ["arithmetic", "units", "string", "date", "factual"]
n_queries = 300             # distinct generated queries (ignored with workload_path)
workload_seed = 0           # draws the generated workload
workload_path = ""          # a JSONL file of your own, see data/README.md; empty: generate
seeds = [0, 1, 2, 3, 4]     # arrival orders and router initialisations: mean and 95 % CI over these
feedback = ["bandit", "full"]  # "bandit": only the served tier's outcome is seen; "full": every tier's
max_tokens = 16
routers = ["fastgrnn", "knn", "logreg", "random", "always-smallest", "always-largest", "oracle"]
update_every = 8
# cache_dir "" = <system.cache_dir>/outcomes, outside the source tree (shared by every run and sweep)
cache_dir = ""
run_tags = {}       # extra MLflow tags (the sweep adds a launch id)
experiment_name = "ruvllm-routing"
run_name = ""
'''),
    new_markdown_cell("# Routing: learned router vs baselines\nEvery tier answers every query once (cached); the routers learn "
                      "online from the outcomes they observe, once per seed (arrival order and initialisation). "
                      "Metrics: quality, parameter-weighted cost, latency, cost reduction vs always-largest, "
                      "RouteLLM APGR / CPT; mean and 95 % CI over seeds."),
    new_code_cell(SETUP + '''\
from ruvllm_lab.experiments import routing

cfg = Config.load(project_path(config_path), overrides={**overrides, "inference.models": list(tiers)})
items = (workloads.load_jsonl(project_path(workload_path)) if workload_path
         else workloads.generate(families, n_queries, workload_seed, distinct=True))
tracker = open_notebook_run("01_routing", experiment_name, run_name, run_tags,
                            log={"config_path": config_path, "overrides": overrides, "workload_path": workload_path,
                                 **({} if workload_path else {"families": families, "workload_seed": workload_seed})},
                            name={"n": len(items), "seeds": len(seeds)})
result = routing.run(cfg, items, routers, tiers=tiers, seeds=seeds, feedback=feedback, max_tokens=max_tokens,
                     update_every=update_every, cache_dir=project_path(cache_dir) if cache_dir else None,
                     tracker=tracker)
print(f"{len(items)} queries, {result.outcomes.generated} new generations (the rest from the cache)")
'''),
    new_markdown_cell("## Each tier alone"),
    new_code_cell('display(result.tiers.round(3))'),
    new_markdown_cell("## Routers (mean [95 % CI] over seeds)"),
    new_code_cell('''\
for mode in feedback:
    display(Markdown(f"**{mode} feedback**\\n\\n" + result.to_markdown(mode)))
'''),
    new_code_cell('result.figures["cost_quality"]'),
    new_code_cell('result.figures["online_quality"]'),
    end_run_cell(after='print(f"cost-quality figure: {tracker.artifact_uri}/cost_quality.png")\n'),
])

FORGETTING = notebook([
    params_cell('''\
# Parameters (papermill overrides these)
config_path = "configs/server-cpu.toml"
overrides = {}
pool_size = 300             # distinct generated queries split into the phases by family (ignored with workload_path)
workload_seed = 0
workload_path = ""          # a JSONL file of your own: its families become the phases, in file order
methods = ["naive", "ewc", "online-ewc", "replay", "online-ewc+replay", "full-rehearsal"]
seeds = [0, 1, 2, 3, 4]     # mean and 95 % CI over these
labels = "outcomes"         # cheapest correct tier in the cached routing outcomes; or "synthetic-rule" (no LLM)
tiers = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
ewc_lambda = 100.0
replay_fraction = 0.2       # share of a finished phase's training examples kept for replay
steps_per_phase = 200
max_tokens = 16
run_tags = {}       # extra MLflow tags (the sweep adds a launch id)
experiment_name = "ruvllm-forgetting"
run_name = ""
'''),
    new_markdown_cell("# Forgetting: naive vs EWC vs online EWC vs replay vs full rehearsal\nThe FastGRNN router learns phases of "
                      "a shifting workload through the serving ContinualTrainer; the accuracy matrix gives Avalanche's "
                      "forgetting F and BWT, reported with the number of updates they were measured over (never "
                      "extrapolated); mean and 95 % CI over seeds."),
    new_code_cell(SETUP + '''\
from ruvllm_lab.experiments import forgetting

cfg = Config.load(project_path(config_path), overrides=overrides)
if workload_path:
    items = workloads.load_jsonl(project_path(workload_path))
    schedule = workloads.phases_by_family(items, [(f,) for f in dict.fromkeys(it.family for it in items)])
else:
    schedule = forgetting.default_schedule(pool_size, workload_seed)
tracker = open_notebook_run("02_forgetting", experiment_name, run_name, run_tags,
                            log={"config_path": config_path, "overrides": overrides, "workload_path": workload_path,
                                 **({} if workload_path else {"pool_size": pool_size, "workload_seed": workload_seed})},
                            name={"lambda": ewc_lambda, "seeds": len(seeds)})
result = forgetting.run(cfg, schedule, methods, seeds=seeds, labels=labels, tiers=tiers, ewc_lambda=ewc_lambda,
                        replay_fraction=replay_fraction, steps_per_phase=steps_per_phase, max_tokens=max_tokens,
                        tracker=tracker)
display(Markdown(result.to_markdown()))
'''),
    new_code_cell('''\
for method, matrix in result.matrices.items():
    display(Markdown(f"**{method}**, first seed (rows: after training phase i; columns: accuracy on phase j)"))
    display(matrix.round(3))
'''),
    new_code_cell('result.figures["accuracy_over_time"]'),
    new_code_cell('result.figures["forgetting_summary"]'),
    end_run_cell(),
])

COMPRESSION = notebook([
    params_cell('''\
# Parameters (papermill overrides these); the defaults are the README run
config_path = "configs/edge.toml"
overrides = {}
n_interactions = 300        # distinct stored interactions per seed
cluster_counts = [4, 16]
depths = [1, 2]
seeds = [0, 1, 2, 3, 4]     # mean and 95 % bootstrap CI over these
n_eval = 40                 # held-out paraphrased questions per seed
token_budget = 64           # one context budget for every configuration (embedder tokens)
beam = 2                    # concepts expanded per layer in descent
modes = ["descent", "collapsed"]
summaries = "llm"           # "extractive": key terms only, no model
answer_quality = True
run_tags = {}       # extra MLflow tags (the sweep adds a launch id)
experiment_name = "ruvllm-compression"
run_name = ""
'''),
    new_markdown_cell("# Compression: ratio, storage, retrieval cost, recall and answer quality\n"
                      "A memory of N interactions is compressed into concept nodes at several cluster counts and "
                      "depths; held-out paraphrased questions retrieve into one fixed token budget by tree descent "
                      "and by RAPTOR's collapsed tree."),
    new_code_cell(SETUP + '''\
from ruvllm_lab.experiments import compression

cfg = Config.load(project_path(config_path), overrides=overrides)
tracker = open_notebook_run("03_compression", experiment_name, run_name, run_tags,
                            log={"config_path": config_path, "overrides": overrides},
                            name={"n": n_interactions})
result = compression.run(cfg, n_interactions, cluster_counts, depths, seeds=seeds, n_eval=n_eval,
                         token_budget=token_budget, beam=beam, modes=modes, summaries=summaries,
                         answer_quality=answer_quality, tracker=tracker)
display(Markdown(result.to_markdown()))
'''),
    new_code_cell('result.figures["ratio_recall"]'),
    end_run_cell(),
])

RESULTS = notebook([
    params_cell('''\
# Parameters (papermill overrides these)
# MLflow experiments to compare (the sweeps of experiments/grids/*.toml); missing ones are skipped
experiments = ["ruvllm-routing-sweep", "ruvllm-forgetting-sweep", "ruvllm-compression-sweep"]
baselines = {}     # per kind, e.g. {"routing": "always-smallest"}; default: always-largest, naive, baseline
metrics = {}       # per kind, e.g. {"forgetting": ["forgetting"]}; default: a few per kind
by = {}            # per kind, grouping params; default: every param that varies across runs, seeds excepted
tracking_uri = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlruns/mlflow.db
out_dir = "runs/compare"   # CSV tables and PNG figures also go here; empty: do not write
'''),
    new_markdown_cell("# Results: every configuration with n, mean, 95 % CI and the difference against a baseline\n"
                      "Runs that differ only in their seed are replicates of one configuration; the configuration is "
                      "every other parameter that varies across the runs (the sweep grid's axes). "
                      "CI: Student-t over the runs; the difference against the baseline is paired by run "
                      "(each run measures both on the same workload and seed). "
                      "Make runs with `python experiments/sweep.py experiments/grids/<grid>.toml`."),
    new_code_cell(SETUP + '''\
import pandas as pd
from ruvllm_lab.experiments import results as R

found = []
for name in experiments:
    try:
        found.append(R.load_runs(name, tracking_uri or None))
    except KeyError as e:
        print("skipped:", e.args[0])
runs = pd.concat(found, ignore_index=True) if found else pd.DataFrame()
report = R.compare_runs(runs, baselines, by or None, per_seed=R.load_per_seed(runs, tracking_uri or None))
out = project_path(out_dir) if out_dir else None
if out is not None:
    out.mkdir(parents=True, exist_ok=True)
print(f"{len(runs)} finished run(s); experiment kinds: {', '.join(report) or 'none'}; CI: {R.CI_METHOD}")
'''),
    new_code_cell('''\
for kind, cmp in report.items():
    display(Markdown(f"## {kind}\\n{cmp.n_runs} run(s); configurations by "
                     f"{', '.join(f'`{a}`' for a in cmp.axes) or 'nothing (one configuration)'}; "
                     f"baseline `{cmp.baseline}`"))
    for metric in [m for m in metrics.get(kind, R.KINDS[kind].metrics) if m in cmp.metrics]:
        table = cmp.table(metric)
        display(Markdown(f"### {metric}"))
        display(table)
        fig = cmp.plot(metric)
        display(fig)
        if out is not None:
            table.to_csv(out / f"{kind}_{metric}.csv", index=False)
            fig.savefig(out / f"{kind}_{metric}.png", dpi=120, bbox_inches="tight")
if not report:
    display(Markdown("No routing, forgetting or compression runs yet: run a sweep first."))
'''),
])

MEMORY = notebook([
    params_cell('''\
# Parameters (papermill overrides these); the README run uses the defaults on server-cpu
config_path = "configs/server-cpu.toml"
overrides = {}
tiers = []                 # empty: every tier of the profile, smallest first
seeds = [0, 1, 2, 3, 4]    # mean and 95 % t-interval over these
n_seeded = 6               # questions answered first with a gold check (verified), then repeated and paraphrased
n_fresh = 4                # never-asked questions per tier
n_cross = 6                # questions every tier answers in turn, smallest first (the cross-tier case)
n_corrected = 4            # questions corrected by a user, then asked as paraphrases
policies = ["off", "all", "verified"]
max_tokens = 32
run_tags = {}
experiment_name = "ruvllm-memory"
run_name = ""
'''),
    new_markdown_cell("# Memory ablation: does memory make answers better, or stay silent?\n"
                      "Held-out questions go through the whole loop with no notes (`off`), every relevant memory "
                      "(`all`, unverified answers included) and only trusted memories (`verified`). Cases: fresh "
                      "questions, a larger tier after smaller tiers answered the same questions (cross), exact "
                      "repeats and paraphrases of questions whose earlier answers were verified, and paraphrases "
                      "of questions a user corrected. Strict answer matching; mean and 95 % CI over seeds."),
    new_code_cell(SETUP + '''\
from ruvllm_lab.experiments import memory_ablation

cfg = Config.load(project_path(config_path), overrides=overrides)
tracker = open_notebook_run("05_memory", experiment_name, run_name, run_tags,
                            log={"config_path": config_path, "overrides": overrides},
                            name={"seeds": len(seeds)})
result = memory_ablation.run(cfg, tiers or None, seeds, n_seeded=n_seeded, n_fresh=n_fresh, n_cross=n_cross,
                             n_corrected=n_corrected, policies=policies, max_tokens=max_tokens, tracker=tracker)
display(Markdown(result.to_markdown()))
'''),
    new_code_cell('result.figures["accuracy"]'),
    end_run_cell(),
])

NOTEBOOKS = {"00_quickstart.ipynb": QUICKSTART, "01_routing.ipynb": ROUTING, "02_forgetting.ipynb": FORGETTING,
             "03_compression.ipynb": COMPRESSION, "04_results.ipynb": RESULTS, "05_memory.ipynb": MEMORY}


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
