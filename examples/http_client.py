"""Plain HTTP client for a running RuvLLM server, standard library only (urllib).

Start a server, e.g.  .venv/bin/ruvllm serve --config configs/edge.toml   (or scripts/start.sh), then:

    python3 examples/http_client.py "What is the capital of France?"
    python3 examples/http_client.py --stream --rate 5 --correct "Paris." "What is the capital of France?"
    python3 examples/http_client.py --url http://127.0.0.1:8080 --health-only

It checks GET /v1/health, asks POST /v1/query (``"stream": true`` reads Server-Sent Events:
``event: chunk`` lines carry text, the final ``event: done`` carries the full response), and with
--rate/--correct sends POST /v1/feedback for that answer.  When the server has RUVLLM_API_KEYS set,
export RUVLLM_API_KEY=<one of them>; it is sent as ``Authorization: Bearer <key>``.
Exit status: 0 on success, 1 when the server answers with an error (printed to stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request


class Client:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def _open(self, method: str, path: str, body: dict | None = None):
        headers = {"Accept": "application/json, text/event-stream"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        return urllib.request.urlopen(req, timeout=self.timeout)  # raises HTTPError for 4xx/5xx

    def _json(self, method: str, path: str, body: dict | None = None) -> dict:
        with self._open(method, path, body) as resp:
            return json.loads(resp.read())

    def health(self) -> dict:
        """The component report (``/v1/health/ready``, needs the key); without a key, liveness only."""
        path = "/v1/health/ready" if self.api_key else "/v1/health"
        try:
            return self._json("GET", path)
        except urllib.error.HTTPError as e:
            if e.code == 503:  # critical or draining: the body is still the health report
                return json.loads(e.read())
            raise

    def query(self, text: str, **fields) -> dict:
        return self._json("POST", "/v1/query", {"query": text, **fields})

    def query_stream(self, text: str, **fields):
        """Yield text chunks; the last item yielded is the full response dict (from ``event: done``)."""
        with self._open("POST", "/v1/query", {"query": text, "stream": True, **fields}) as resp:
            event = None
            for raw in resp:  # one SSE line at a time
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data = json.loads(line[5:].strip())
                    yield data["text"] if event == "chunk" else data
                    if event == "done":
                        return

    def feedback(self, request_id: str, rating: int | None = None, correction: str | None = None) -> dict:
        body = {"request_id": request_id}
        if rating is not None:
            body["rating"] = rating
        if correction is not None:
            body["correction"] = correction
        return self._json("POST", "/v1/feedback", body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Plain HTTP client for a running RuvLLM server")
    p.add_argument("query", nargs="?", help="the question to ask")
    p.add_argument("--url", default=os.environ.get("RUVLLM_URL", "http://127.0.0.1:8080"))
    p.add_argument("--stream", action="store_true", help="read the answer as Server-Sent Events")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--session", default=None, help="session id for multi-turn")
    p.add_argument("--rate", type=int, choices=range(1, 6), metavar="1-5", help="rate the answer")
    p.add_argument("--correct", metavar="TEXT", help="send a correction for the answer")
    p.add_argument("--health-only", action="store_true")
    args = p.parse_args(argv)
    if not args.query and not args.health_only:
        p.error("give a query, or --health-only")

    client = Client(args.url, os.environ.get("RUVLLM_API_KEY") or None)
    try:
        health = client.health()
        if "overall" not in health:  # no key: the open liveness probe
            print(f"health: {health['status']} (liveness only; the component report needs a key)")
            if args.health_only:
                return 0 if health["status"] == "ok" else 1
        else:
            print(f"health: {health['overall']} (" + ", ".join(
                f"{name} {'ok' if health[name]['healthy'] else 'DOWN: ' + str(health[name]['error'])}"
                for name in ("memory", "router", "inference")) + ")")
            if args.health_only:
                return 0 if health["overall"] != "critical" else 1

        fields = {}
        if args.session:
            fields["session_id"] = args.session
        if args.max_tokens:
            fields["constraints"] = {"max_tokens": args.max_tokens}
        if args.stream:
            print("answer: ", end="", flush=True)
            response = None
            for item in client.query_stream(args.query, **fields):
                if isinstance(item, str):
                    print(item, end="", flush=True)
                else:
                    response = item
            print()
            if response is None:
                print("error: the stream ended without its final 'done' event", file=sys.stderr)
                return 1
        else:
            response = client.query(args.query, **fields)
            print(f"answer: {response['text'].strip()}")
        print(f"request_id={response['request_id']} tier={response['routing_info'].get('tier')} "
              f"confidence={response['confidence']:.2f} latency={response['latency_ms'].get('total', 0):.0f} ms")

        if args.rate is not None or args.correct:
            fb = client.feedback(response["request_id"], rating=args.rate, correction=args.correct)
            print(f"feedback recorded: score={fb.get('score')} correction_node={fb.get('correction_node')}")
    except urllib.error.HTTPError as e:
        body = e.read().decode("utf-8", "replace")
        try:
            body = json.loads(body).get("detail", body)
        except (ValueError, AttributeError):
            pass
        print(f"error: HTTP {e.code} from {e.url}: {body}", file=sys.stderr)
        return 1
    except urllib.error.URLError as e:
        print(f"error: cannot reach {args.url}: {e.reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
