"""`ruvllm` command line: validate, init, models, version, serve, query, backup, restore, compress,
calibrate-relevance, bench."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .config import Config
from .errors import ConfigError, RuvLLMError


def _load(args) -> Config:
    return Config.load(args.config, overrides=args.set or None)


def cmd_validate(args) -> int:
    cfg = _load(args)  # keys, values and tiers (against the model ladder); ConfigError lists every problem
    _check_router_kind(cfg)
    print(f"{args.config}: ok ({cfg.system.device_class}, tiers: {', '.join(cfg.inference.models)}, "
          f"router: {cfg.router.kind})")
    return 0


def _check_router_kind(cfg: Config) -> None:
    """router.kind names a registered router, always-<configured tier>, or an importable package.module:Class."""
    import difflib

    from .router import ROUTERS
    from .router.base import resolve_router_class
    kind, tiers = cfg.router.kind, list(cfg.inference.models)
    if kind in ROUTERS or (kind.startswith("always-") and kind[len("always-"):] in tiers):
        return
    if ":" in kind:
        resolve_router_class(kind)  # raises ConfigError saying why it cannot be imported
        return
    names = list(ROUTERS) + [f"always-{t}" for t in tiers]
    near = difflib.get_close_matches(kind, names, n=1)
    raise ConfigError([f"router.kind = {kind!r}: unknown router{f'; did you mean {near[0]!r}?' if near else ''} "
                       f"known: {', '.join(names)} (or package.module:Class)"])


def cmd_init(args) -> int:
    from .memory import MemoryService
    cfg = _load(args)
    existed = cfg.memory.backend != "sqlite" or Path(cfg.memory.db_path).exists()
    store = MemoryService(cfg.memory, dimension=cfg.embedding.dimension)
    n = store.count()
    where = store.backend.location
    store.close()
    print(f"memory store {'opened' if existed else 'created'}: {where} ({n} nodes, dim {cfg.embedding.dimension})")
    return 0


def cmd_models(args) -> int:
    from . import models
    cfg = _load(args) if args.config else None
    names = set(cfg.inference.models) if cfg else None
    rows = models.ladder_table(assemble=args.assemble)
    header = f"{'tier':<20} {'params':>8} {'size MB':>8} {'arch':<7} {'format':<10} {'cost':>5}  {'status':<26} path"
    print(header)
    print("-" * len(header))
    missing = []
    for r in rows:
        if names is not None and r.tier not in names:
            continue
        print(f"{r.tier:<20} {r.params_m:>7.0f}M {r.size_mb:>8.1f} {r.arch:<7} {r.prompt_format:<10} {r.relative_cost:>5.2f}  {r.status:<26} {r.path}")
        if r.status == "not installed":
            missing.append(r.tier)
    if cfg:
        for name in cfg.inference.models:
            if name not in models.LADDER:
                spec = models.resolve(name)
                print(f"{spec.display:<20} {spec.params_m:>7.0f}M {spec.size_bytes / 1e6:>8.1f} {spec.arch:<7} {spec.prompt_format:<10} {spec.relative_cost:>5.2f}  {'ready':<26} {spec.path_override}")
    if args.check and missing:
        print(f"missing tiers: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def cmd_version(args) -> int:
    print(__version__)
    return 0


def cmd_serve(args) -> int:
    from .server.app import serve
    cfg = _load(args)
    serve(cfg, host=args.host, port=args.port)
    return 0


def cmd_query(args) -> int:
    from .orchestrator import RuvLLM
    from .types import Constraints, Request
    cfg = _load(args)
    with RuvLLM(cfg) as llm:
        resp = llm.query_with(Request(query=args.text, constraints=Constraints(model=args.model, max_tokens=args.max_tokens)))
    if args.json:
        print(json.dumps(resp.to_dict(), indent=2, default=str))
    else:
        print(resp.text)
        print(f"\n[tier={resp.routing_info.get('tier')} confidence={resp.confidence:.2f} "
              f"latency={resp.latency_ms.get('total', 0):.0f} ms sources={len(resp.sources)}]", file=sys.stderr)
    return 0


def cmd_backup(args) -> int:
    from .backup import backup
    cfg = _load(args)
    out = backup(cfg, args.dir)
    print(f"backup complete: {out}")
    return 0


def cmd_restore(args) -> int:
    from .backup import restore
    cfg = _load(args)
    restore(cfg, args.dir)
    print(f"restored from {args.dir} into {cfg.memory.db_path} and {cfg.system.data_dir}")
    return 0


def cmd_compress(args) -> int:
    from .compression import compress_store
    cfg = _load(args)
    report = compress_store(cfg)
    print(json.dumps(report, indent=2, default=str))
    return 0


def cmd_bench(args) -> int:
    import runpy
    script = Path(__file__).resolve().parent.parent / "benches" / "pipeline.py"
    argv = (["--config", args.config] if args.config else []) + [f"--set={s}" for s in args.set or []]
    return runpy.run_path(str(script))["main"](argv + getattr(args, "bench_args", []))


def cmd_calibrate_relevance(args) -> int:
    """Calibrate retrieval.relevance_threshold for the profile's embedding model (calib split)."""
    from .embedding import EmbeddingService
    from .inference import InferencePool
    from .relevance import calibrate
    cfg = _load(args)
    pool = InferencePool(cfg.inference, cfg.system) if cfg.embedding.model == "llm-encoder" else None
    try:
        result = calibrate(EmbeddingService(cfg.embedding, pool=pool).embed, args.max_false_positive_rate)
    finally:
        if pool is not None:
            pool.close()
    model = cfg.embedding.model + (f"-{cfg.embedding.encoder_tier}" if cfg.embedding.model == "llm-encoder" else
                                   "-int8" if cfg.embedding.runtime == "onnx-int8" else "")
    out = Path(args.out_dir) / f"{model}-{cfg.embedding.dimension}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"embedding": model, "dimension": cfg.embedding.dimension, **result}, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"\nwrote {out}; put in the profile:\n[retrieval]\nrelevance_threshold = {result['threshold']:.4f}\n"
          f'calibration = "{out}"')
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ruvllm", description="RuvLLM lab command line")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help, config_required=True):
        sp = sub.add_parser(name, help=help)
        sp.add_argument("--config", required=config_required, default=None, help="TOML profile, e.g. configs/edge.toml")
        sp.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
        sp.set_defaults(fn=fn)
        return sp

    add("validate", cmd_validate, "check a config profile; exit 2 listing every problem")
    add("init", cmd_init, "create the memory store")
    sp = add("models", cmd_models, "list the model ladder", config_required=False)
    sp.add_argument("--assemble", action="store_true", help="assemble split tiers into the model cache")
    sp.add_argument("--check", action="store_true", help="exit 1 when a configured tier is missing")
    add("version", cmd_version, "print the version", config_required=False)
    sp = add("serve", cmd_serve, "run the HTTP server")
    sp.add_argument("--host", default=None)
    sp.add_argument("--port", type=int, default=None)
    sp = add("query", cmd_query, "answer one query through the whole pipeline")
    sp.add_argument("text")
    sp.add_argument("--model", default=None, help="force a tier")
    sp.add_argument("--max-tokens", type=int, default=None)
    sp.add_argument("--json", action="store_true")
    sp = add("backup", cmd_backup, "back up memory, router, EWC, replay and config")
    sp.add_argument("dir")
    sp = add("restore", cmd_restore, "restore a backup made by `ruvllm backup`")
    sp.add_argument("dir")
    add("compress", cmd_compress, "summarise memory clusters into concept nodes")
    sp = add("calibrate-relevance", cmd_calibrate_relevance,
             "calibrate retrieval.relevance_threshold for the profile's embedding model")
    sp.add_argument("--max-false-positive-rate", type=float, default=0.01,
                    help="share of unrelated question pairs allowed through (default 0.01)")
    sp.add_argument("--out-dir", default="configs/calibration")
    sp = add("bench", cmd_bench, "end-to-end pipeline benchmark (benches/pipeline.py)", config_required=False)
    sp.epilog = ("Other options go to benches/pipeline.py (see its --help): --quick, --memory-nodes, --n-requests, "
                 "--concurrency, --max-tokens, --warmup, --out.")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.bench_args = extra  # `ruvllm bench` hands these to benches/pipeline.py
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuvLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
