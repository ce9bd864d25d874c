"""`quill bench latency` end to end on the CPU: its --json report accounts for the work it timed
(every run prefills its prompts in full, although the runs repeat the same prompts, so "prefill"
times a prefill and not a prefix-cache lookup; the batch runs at once), and bad arguments get one
clear message."""
import json
import subprocess

import pytest


def bench(quill_bin, *args):
    return subprocess.run([str(quill_bin), "bench", "latency", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_every_run_prefills_in_full(quill_bin, tiny_model):
    r = bench(quill_bin, tiny_model, "--input-len", 48, "--output-len", 5, "--batch-size", 2, "--iters", 3,
              "--warmup", 1, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["batch_size"], out["input_len"], out["output_len"], out["iters"]) == (2, 48, 5, 3)
    assert out["prompt_tokens"] == (1 + 3) * 2 * 48
    assert out["prefix_hit_tokens"] == 0
    assert out["peak_step_seqs"] == 2  # the batch runs at once
    assert 0 < out["avg_prefill_s"] < out["avg_latency_s"]
    assert out["decode_step_ms"] > 0 and out["peak_rss_bytes"] > 0
    p = out["percentiles_s"]
    assert p["10"] <= p["50"] <= p["90"] <= p["99"]


@pytest.mark.parametrize("args, needle", [
    (["--input-len", "0"], "--input-len"),
    (["--iters", "x"], "--iters"),
    (["--bogus"], "--bogus"),
])
def test_bad_arguments(quill_bin, tiny_model, args, needle):
    r = bench(quill_bin, tiny_model, *args)
    assert r.returncode != 0
    assert needle in r.stderr
