"""Terminal chat over the RuvLLM SDK: one multi-turn session, with feedback on the last answer.

Run from the repository root:

    HF_HUB_OFFLINE=1 .venv/bin/python examples/chat.py [--config configs/edge.toml]
        [--set memory.db_path=/tmp/chat/memory.db --set system.data_dir=/tmp/chat/state ...]

Type a question to ask it (the answer streams in); then
    /rate N        rate the last answer from 1 (bad) to 5 (good)
    /correct TEXT  store TEXT as the verified answer to the last question (recalled next time)
    /quit          leave (so does end of input); memory and learned state are saved on exit
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ruvllm_lab import Config, Feedback, Request, RuvLLM
from ruvllm_lab.errors import RuvLLMError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "edge.toml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Terminal chat over the RuvLLM SDK")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="TOML profile (default: configs/edge.toml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. memory.db_path=/tmp/m.db (repeatable)")
    args = p.parse_args(argv)

    config = Config.load(args.config, overrides=args.set or None)
    print(f"loading {args.config} ({', '.join(config.inference.models)}) ...", flush=True)
    with RuvLLM(config) as llm:
        session = llm.new_session()
        last = None  # the last Response, the target of /rate and /correct
        print("ready: ask a question; /rate N, /correct TEXT, /quit", flush=True)
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                break
            if not line:
                continue
            command, _, rest = line.partition(" ")
            rest = rest.strip()
            if command == "/quit":
                break
            if command in ("/rate", "/correct"):
                if last is None:
                    print("nothing to give feedback on yet: ask a question first")
                    continue
                try:
                    if command == "/rate":
                        fb = Feedback(last.request_id, rating=int(rest))
                    else:
                        fb = Feedback(last.request_id, correction=rest)
                    result = llm.feedback(fb)
                except ValueError as e:  # not an integer 1-5, or an empty correction
                    print(f"usage: /rate N (1-5) or /correct TEXT ({e})")
                    continue
                except RuvLLMError as e:
                    print(f"feedback failed: {e}")
                    continue
                if command == "/rate":
                    print(f"rated {fb.rating}/5 (quality score {result['score']:.2f})")
                else:
                    print(f"correction stored (memory node {result['correction_node']}); "
                          f"it will be recalled for this question")
                continue
            if command.startswith("/"):
                print(f"unknown command {command}; use /rate N, /correct TEXT or /quit")
                continue

            stream = llm.query_stream(Request(query=line, session_id=session.id))
            print("bot> ", end="", flush=True)
            try:
                for chunk in stream:
                    print(chunk, end="", flush=True)
            except RuvLLMError as e:  # overloaded, deadline, context overflow: report it and go on
                print(f"\n[error: {e}]")
                continue
            last = stream.response
            print(f"\n     [tier={last.routing_info.get('tier')} confidence={last.confidence:.2f} "
                  f"latency={last.latency_ms.get('total', 0):.0f} ms sources={len(last.sources)}]", flush=True)
    print("bye: memory and learned state saved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
