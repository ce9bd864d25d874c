#!/usr/bin/env python3
"""Soak test for `quill serve`: N concurrent streaming clients for a while, then checks that no
request failed, that the server's memory stayed flat, and that every sequence, KV block and
request state was released at the end.

Each client loops: a chat or a completions request (streamed, with usage), random prompt length,
random max_tokens, greedy or sampled, sometimes with stop strings, n=2 or logprobs, and one chat
request in five constrained: a JSON schema, a choice of strings, or a forced tool call (named or
"required"), whose output must parse and fit when it ends by itself; one request in twenty hangs
up mid-stream on purpose (the server must free it; that is not an error). Every other request must
end with a finish_reason, a usage chunk whose completion_tokens matches the tokens streamed (when
logprobs are on), and "data: [DONE]". --speculative serves with n-gram speculative decoding (the
prompts then repeat themselves, so drafts are found). The server's log must hold no sanitizer
report (run it with an ASan/UBSan build: --quill build-asan/quill).

Memory: the server's RSS is sampled every 5 s; after a warm-up (the first 20% of the run, when the
KV pool's pages are first touched and the allocator grows to its working set) the RSS must not
grow by more than --max-growth-mb.

    python3 scripts/soak.py                       # 100 clients, 300 s, CPU, tiny-qwen3
    python3 scripts/soak.py --clients 20 --duration 30 --quill build/quill --model /path/to/model
Prints a JSON summary and exits non-zero on any failure."""
import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex every jolly "
         "mountain river under bright autumn skies").split()
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}}},
          "required": ["name", "age"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}]
ENDS_UP = {"151643": 30, "151645": 30}  # a random model's outputs then mostly end by themselves


def constrain(body, rng):
    """Makes a chat request constrained; returns its kind."""
    kind = rng.choice(["schema", "choice", "tool", "required"])
    body.pop("stop", None)  # (a stop string may cut the value short, as it should)
    body["chat_template_kwargs"] = {"enable_thinking": False}
    body["logit_bias"] = ENDS_UP
    body["max_tokens"] = rng.randint(16, 96)
    if kind == "schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    elif kind == "choice":
        body["guided_choice"] = ["yes", "no", "maybe not"]
    else:
        body["tools"] = TOOLS
        body["tool_choice"] = "required" if kind == "required" else {"type": "function",
                                                                     "function": {"name": "get_weather"}}
    return kind


def check_constrained(kind, finish, content, calls):
    """None, or what is wrong with a constrained choice that ended by itself."""
    if finish == "length":
        return None
    try:
        if kind == "schema":
            v = json.loads(content)
            ok = isinstance(v, dict) and isinstance(v.get("name"), str) and type(v.get("age")) is int
            return None if ok else f"schema output {content!r}"
        if kind == "choice":
            return None if content in ("yes", "no", "maybe not") else f"choice output {content!r}"
        if not calls or content:
            return f"tool output: content {content!r}, calls {calls}"
        for name, args in calls.values():
            a = json.loads(args)
            if name not in ("get_weather", "ping") or not isinstance(a, dict) or \
                    (name == "get_weather" and not isinstance(a.get("city"), str)):
                return f"tool call {name} {args!r}"
    except ValueError as e:
        return f"{kind} output does not parse ({e}): {content!r} {calls}"
    return None


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def metrics(url):
    out = {}
    for line in requests.get(url + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[re.sub(r'model_name="[^"]*",?', "", key).replace("{}", "")] = float(value)
    return out


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.ok = self.hangups = self.tokens = 0
        self.errors = []

    def add(self, ok=0, hangups=0, tokens=0, error=None):
        with self.lock:
            self.ok += ok
            self.hangups += hangups
            self.tokens += tokens
            if error:
                self.errors.append(error)


def one_request(url, model, rng, stats, repeat):
    chat = rng.random() < 0.5
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 120)))
    if repeat:  # something for n-gram drafts to find
        words = " ".join([words[:rng.randint(10, 80)]] * rng.randint(2, 4))
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": rng.randint(1, 64), "ignore_eos": rng.random() < 0.5}
    if rng.random() < 0.5:
        body["temperature"] = 0
    else:
        body.update(temperature=0.8, top_p=0.9, top_k=50, seed=rng.randint(0, 1 << 30))
    if rng.random() < 0.2:
        body["stop"] = ["ing", "\n\n"]
    n = 2 if rng.random() < 0.1 else 1
    body["n"] = n
    lp = rng.random() < 0.3
    kind = None
    if chat:
        body["messages"] = [{"role": "user", "content": words}]
        if lp:
            body.update(logprobs=True, top_logprobs=2)
        if rng.random() < 0.3:
            body["chat_template_kwargs"] = {"enable_thinking": False}
        if rng.random() < 0.2:
            kind = constrain(body, rng)
    else:
        body["prompt"] = words
        if lp:
            body["logprobs"] = 1
    hang_up = rng.random() < 0.05
    path = "/v1/chat/completions" if chat else "/v1/completions"
    try:
        with requests.post(url + path, json=body, stream=True, timeout=600) as r:
            if r.status_code != 200:
                stats.add(error=f"HTTP {r.status_code}: {r.text[:200]}")
                return
            finishes, usage, done, streamed, chunks = {}, None, False, 0, 0
            content, calls = {}, {}  # per choice: text; (choice, call index) -> [name, arguments]
            for line in r.iter_lines():
                if not line:
                    continue
                if not line.startswith(b"data: "):
                    stats.add(error=f"bad SSE line {line[:80]!r}")
                    return
                data = line[6:]
                if data == b"[DONE]":
                    done = True
                    break
                ev = json.loads(data)
                chunks += 1
                if hang_up and chunks == 3:
                    stats.add(hangups=1)
                    return  # closing the response drops the connection mid-stream
                for c in ev.get("choices", []):
                    if c.get("finish_reason"):
                        finishes[c["index"]] = c["finish_reason"]
                    delta = c.get("delta") or {}
                    content[c["index"]] = content.get(c["index"], "") + (delta.get("content") or "")
                    for tc in delta.get("tool_calls") or []:
                        call = calls.setdefault((c["index"], tc["index"]), ["", ""])
                        fn = tc.get("function") or {}
                        call[0] += fn.get("name") or ""
                        call[1] += fn.get("arguments") or ""
                    l = c.get("logprobs")
                    if l:
                        streamed += len(l["content"]) if chat else len(l["tokens"])
                if ev.get("usage"):
                    usage = ev["usage"]
            if not done or len(finishes) != n or not usage:
                stats.add(error=f"incomplete stream: done={done} finishes={finishes} usage={usage}")
                return
            if lp and streamed != usage["completion_tokens"]:
                stats.add(error=f"{streamed} logprob entries for {usage['completion_tokens']} tokens")
                return
            for i in range(n if kind else 0):
                wrong = check_constrained(kind, finishes[i], content.get(i, ""),
                                          {k: v for k, v in calls.items() if k[0] == i})
                if wrong:
                    stats.add(error=wrong)
                    return
            stats.add(ok=1, tokens=usage["completion_tokens"])
    except Exception as e:  # noqa: BLE001 - every failure is counted and reported
        stats.add(error=f"{type(e).__name__}: {e}")


def client(url, model, seed, deadline, stats, repeat):
    rng = random.Random(seed)
    while time.time() < deadline:
        one_request(url, model, rng, stats, repeat)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quill", default=os.environ.get("QUILL_BIN", os.path.join(ROOT, "build", "quill")))
    ap.add_argument("--model", help="model directory (default: a fresh tiny-qwen3)")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--duration", type=float, default=300)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-growth-mb", type=float, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--speculative", action="store_true", help="serve with n-gram speculative decoding")
    ap.add_argument("--json", help="also write the summary here")
    a = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model = a.model
    if not model:
        model = os.path.join(tmp.name, "tiny-qwen3")
        subprocess.run([a.quill, "random-model", "--preset", "tiny-qwen3", model], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = open(os.path.join(tmp.name, "server.log"), "w+")
    spec = ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4}'] if a.speculative else []
    srv = subprocess.Popen([a.quill, "serve", model, "--port", "0", "--device", a.device, "--served-model-name",
                            "soak", "--max-num-seqs", str(a.max_num_seqs), "--max-model-len", "1024", *spec],
                           stdout=subprocess.DEVNULL, stderr=log)
    url = None
    for _ in range(600):
        log.seek(0)
        m = re.search(r"listening on (http://\S+)", log.read())
        if m:
            url = m.group(1)
            break
        if srv.poll() is not None:
            break
        time.sleep(0.1)
    if not url:
        log.seek(0)
        sys.exit("quill serve did not start:\n" + log.read())

    stats = Stats()
    t0 = time.time()
    deadline = t0 + a.duration
    threads = [threading.Thread(target=client, args=(url, "soak", i, deadline, stats, a.speculative), daemon=True)
               for i in range(a.clients)]
    for t in threads:
        t.start()
    samples = []  # (seconds, rss MB, running, waiting)
    while any(t.is_alive() for t in threads):
        m = metrics(url)
        samples.append((round(time.time() - t0, 1), rss_kb(srv.pid) / 1024,
                        m["quill:num_requests_running"], m["quill:num_requests_waiting"]))
        time.sleep(5)
    for t in threads:
        t.join()
    elapsed = time.time() - t0

    # Everything released?
    for _ in range(100):
        m = metrics(url)
        if m["quill:num_requests_running"] == m["quill:num_requests_waiting"] == 0 and \
                m["quill:kv_cache_blocks_used"] == 0 and m["quill:num_http_requests_active"] == 0:
            break
        time.sleep(0.1)
    final_rss = rss_kb(srv.pid) / 1024
    srv.send_signal(2)
    rc = srv.wait(60)
    log.seek(0)
    reports = [l.strip() for l in log if "runtime error:" in l or "AddressSanitizer" in l or "LeakSanitizer" in l]

    warm = [s for s in samples if s[0] >= 0.2 * a.duration] or samples
    growth = max(s[1] for s in warm) - warm[0][1]
    summary = {
        "clients": a.clients, "duration_s": round(elapsed, 1), "requests_ok": stats.ok,
        "deliberate_hangups": stats.hangups, "errors": len(stats.errors), "first_errors": stats.errors[:5],
        "generated_tokens": stats.tokens, "tokens_per_s": round(stats.tokens / elapsed, 1),
        "requests_per_s": round(stats.ok / elapsed, 2),
        "rss_mb": {"start": round(samples[0][1], 1), "after_warmup": round(warm[0][1], 1),
                   "max_after_warmup": round(max(s[1] for s in warm), 1), "end": round(final_rss, 1),
                   "growth_after_warmup": round(growth, 1)},
        "max_running": max(s[2] for s in samples), "max_waiting": max(s[3] for s in samples),
        "final": {k: m[k] for k in ("quill:num_requests_running", "quill:num_requests_waiting",
                                    "quill:kv_cache_blocks_used", "quill:num_http_requests_active")},
        "http_responses": {k: v for k, v in m.items() if k.startswith("quill:http_requests_total")},
        "spec_decode": {k: v for k, v in m.items() if "spec_decode" in k},
        "server_exit_code": rc, "sanitizer_reports": reports[:5],
        "samples": [{"t": t, "rss_mb": round(r, 1), "running": run, "waiting": wait} for t, r, run, wait in samples],
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    failed = (stats.errors or growth > a.max_growth_mb or any(v != 0 for v in summary["final"].values())
              or rc != 0 or stats.ok == 0 or reports)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
