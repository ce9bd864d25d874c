#!/usr/bin/env python3
"""Encode speed of `quill tokenize` against Hugging Face `tokenizers` on the same texts.

Both encode each whole text in one call (tokenizers: Tokenizer.encode(text,
add_special_tokens=False), single-threaded as a single encode is), best of --runs; the load time
of tokenizer.json is reported separately. The ids are compared too, so a fast wrong answer shows.

usage: scripts/bench_tokenizer.py [--quill build/quill] [--model assets/tokenizer/qwen3]
                                  [--runs 10] [TEXT_FILE ...]
Without TEXT_FILE: ../shared/reference/eval-python-stdlib.txt (Python source, ~700 KB) and a
~500 KB mixed multilingual text built from the reference tokenizer cases (English, CJK, Korean,
Cyrillic, Arabic, Hindi, emoji, code, special tokens), shuffled with a fixed seed."""
import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QUILL_SHARED", ROOT.parent / "shared"))


def multilingual_text(target_bytes=500_000):
    cases = json.loads((SHARED / "reference" / "tokenizer_cases.json").read_text(encoding="utf-8"))
    pieces = [c["text"] for c in cases["cases"] if c["text"] and len(c["text"]) < 2000]
    rng = random.Random(0)
    out, size = [], 0
    while size < target_bytes:
        p = rng.choice(pieces)
        out.append(p)
        size += len(p.encode()) + 1
    return "\n".join(out)


def bench_quill(quill, model, text, runs):
    r = subprocess.run([quill, "tokenize", model, "--bench", str(runs)], input=text.encode(),
                       capture_output=True, check=True)
    stats = json.loads(r.stdout)
    ids = json.loads(subprocess.run([quill, "tokenize", model], input=text.encode(),
                                    capture_output=True, check=True).stdout)
    return stats, ids


def bench_hf(model, text, runs):
    import tokenizers
    t0 = time.perf_counter()
    tok = tokenizers.Tokenizer.from_file(str(Path(model) / "tokenizer.json"))
    load_s = time.perf_counter() - t0
    best, ids = None, None
    for _ in range(runs):
        t0 = time.perf_counter()
        ids = tok.encode(text, add_special_tokens=False).ids
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return load_s, best, ids


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quill", default=os.environ.get("QUILL_BIN", str(ROOT / "build" / "quill")))
    ap.add_argument("--model", default=str(ROOT / "assets" / "tokenizer" / "qwen3"))
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("texts", nargs="*")
    args = ap.parse_args()

    texts = [(p, Path(p).read_text(encoding="utf-8")) for p in args.texts] or [
        ("eval-python-stdlib.txt", (SHARED / "reference" / "eval-python-stdlib.txt").read_text(encoding="utf-8")),
        ("multilingual (generated)", multilingual_text()),
    ]
    import tokenizers
    print(f"quill: {args.quill}\ntokenizers {tokenizers.__version__}, best of {args.runs} runs\n")
    print(f"{'text':<26} {'bytes':>9} {'tokens':>8}  {'engine':<10} {'MB/s':>8} {'tokens/s':>11}  {'load s':>7}")
    ok = True
    for name, text in texts:
        nbytes = len(text.encode())
        stats, q_ids = bench_quill(args.quill, args.model, text, args.runs)
        load_s, hf_s, hf_ids = bench_hf(args.model, text, args.runs)
        same = q_ids == hf_ids
        ok &= same
        q_s = stats["encode_s"]
        rows = [("quill", q_s, stats["load_s"]), ("tokenizers", hf_s, load_s)]
        for i, (engine, secs, load) in enumerate(rows):
            label = name if i == 0 else ""
            count = f"{len(hf_ids):>8}" if i == 0 else " " * 8
            size = f"{nbytes:>9}" if i == 0 else " " * 9
            print(f"{label:<26} {size} {count}  {engine:<10} {nbytes / secs / 1e6:>8.2f} "
                  f"{len(hf_ids) / secs:>11.0f}  {load:>7.3f}")
        print(f"{'':<26} speed-up {hf_s / q_s:.1f}x, ids {'identical' if same else 'DIFFER'}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
