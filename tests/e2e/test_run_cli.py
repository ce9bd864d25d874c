"""`quill run` end to end: greedy continuations equal transformers' (tiny_ref / small_ref greedy32)
through the CLI, the --json report, chat formatting with the real tokenizer, thinking split, and
every bad input answered with one clear message and a non-zero exit."""
import json
import shutil
import subprocess

import jsonschema
import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from json_prefix import json_prefix


def run(quill_bin, *args, timeout=300):
    return subprocess.run([str(quill_bin), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def run_json(quill_bin, *args):
    r = run(quill_bin, *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# Speculative decoding (n-gram drafts verified in one step) must not change a greedy output: the
# same references, with drafts made and some kept (the random models repeat themselves).
SPEC = ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4}']


def check_spec_stats(out, spec):
    if spec:
        assert out["spec_draft_tokens"] > 0 and 0 < out["spec_accepted_tokens"] <= out["spec_draft_tokens"]
    else:
        assert "spec_draft_tokens" not in out


@pytest.mark.parametrize("spec", [False, True], ids=["plain", "speculative"])
@pytest.mark.parametrize("prompt", ["chat", "raw", "long"])
def test_tiny_greedy_matches_transformers(quill_bin, tiny_model, shared_dir, prompt, spec):
    ref = load_file(str(shared_dir / "reference" / "tiny_ref.safetensors"))
    ids = ",".join(str(i) for i in ref[f"{prompt}.input_ids"])
    out = run_json(quill_bin, "run", tiny_model, "--ids", ids, "-n", 32, "--greedy", "--ignore-eos",
                   *(SPEC if spec else []))
    assert out["ids"] == ref[f"{prompt}.greedy32"].tolist()
    assert out["prompt_ids"] == ref[f"{prompt}.input_ids"].tolist()
    assert out["finish_reason"] == "length"
    assert out["peak_rss_bytes"] > 0 and out["tokens_per_s"] > 0
    check_spec_stats(out, spec)


@pytest.mark.parametrize("spec", [False, True], ids=["plain", "speculative"])
@pytest.mark.parametrize("name", ["len5", "len513"])
def test_small_greedy_matches_transformers(quill_bin, small_model, shared_dir, name, spec):
    ref = load_file(str(shared_dir / "reference" / "small_ref.safetensors"))
    ids = ",".join(str(i) for i in ref[f"{name}.input_ids"])
    out = run_json(quill_bin, "run", small_model, "--ids", ids, "-n", 32, "--greedy", "--ignore-eos",
                   *(SPEC if spec else []))
    assert out["ids"] == ref[f"{name}.greedy32"].tolist()
    check_spec_stats(out, spec)


@pytest.mark.parametrize("config,needle", [
    ('{"method": "eagle", "num_speculative_tokens": 4}', "ngram"),
    ('{"method": "ngram"}', "num_speculative_tokens"),
    ('{"method": "ngram", "num_speculative_tokens": 4, "lookahead": 2}', "lookahead"),
    ('{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 5, "prompt_lookup_max": 3}',
     "prompt_lookup_min"),
    ('[4]', "JSON object"),
])
def test_speculative_config_refused(quill_bin, tiny_model, config, needle):
    r = run(quill_bin, "run", tiny_model, "--ids", "1,2,3", "-n", 4, "--speculative-config", config)
    assert r.returncode != 0 and "--speculative-config" in r.stderr and needle in r.stderr, r.stderr


def test_chat_prompt_is_the_template_tokenized(quill_bin, tiny_model, shared_dir):
    ref = load_file(str(shared_dir / "reference" / "tiny_ref.safetensors"))
    out = run_json(quill_bin, "run", tiny_model, "-p", "Give me a short introduction to large language models.",
                   "-n", 4, "--greedy")
    assert out["prompt_ids"] == ref["chat.input_ids"].tolist()
    raw = run_json(quill_bin, "run", tiny_model, "-p", "The capital of France is", "--raw", "-n", 4, "--greedy")
    assert raw["prompt_ids"] == ref["raw.input_ids"].tolist()


def test_reasoning_and_content_are_the_decoded_ids(quill_bin, tiny_model, shared_dir):
    tok = Tokenizer.from_file(str(shared_dir / "tokenizer" / "qwen3" / "tokenizer.json"))
    out = run_json(quill_bin, "run", tiny_model, "-p", "Hi", "-n", 24, "--seed", 7, "--temperature", 1.0)
    text = tok.decode(out["ids"], skip_special_tokens=True)
    # Thinking mode: with no </think> generated, everything is reasoning (as vLLM's parser does).
    assert out["content"] == "" and out["reasoning"] == text.removeprefix("<think>")
    off = run_json(quill_bin, "run", tiny_model, "-p", "Hi", "--no-think", "-n", 24, "--seed", 7)
    assert off["reasoning"] == "" and off["content"] == tok.decode(off["ids"], skip_special_tokens=True)


def test_same_seed_same_output(quill_bin, tiny_model):
    a = run_json(quill_bin, "run", tiny_model, "-p", "Hello", "-n", 16, "--seed", 3, "--temperature", 1.2)
    b = run_json(quill_bin, "run", tiny_model, "-p", "Hello", "-n", 16, "--seed", 3, "--temperature", 1.2)
    c = run_json(quill_bin, "run", tiny_model, "-p", "Hello", "-n", 16, "--seed", 4, "--temperature", 1.2)
    assert a["ids"] == b["ids"] and a["ids"] != c["ids"]


def test_logit_bias(quill_bin, tiny_model):
    free = run_json(quill_bin, "run", tiny_model, "--ids", "1,2,3", "-n", 6, "--greedy", "--ignore-eos")["ids"]
    forced = 1000 if 1000 not in free else 1001
    out = run_json(quill_bin, "run", tiny_model, "--ids", "1,2,3", "-n", 6, "--greedy", "--ignore-eos",
                   "--logit-bias", f"{forced}=100")
    assert out["ids"] == [forced] * 6
    ban = [a for t in set(free) for a in ("--logit-bias", f"{t}-100")]  # llama.cpp's ID-BIAS form too
    out = run_json(quill_bin, "run", tiny_model, "--ids", "1,2,3", "-n", 6, "--greedy", "--ignore-eos", *ban)
    assert len(out["ids"]) == 6 and not set(free) & set(out["ids"])


def test_structured_output_flags(quill_bin, tiny_model):
    """--json-object and --choice hold the answer (the whole output, or what follows the
    reasoning) to a JSON object or one of the texts."""
    for think in ([], ["--no-think"]):
        out = run_json(quill_bin, "run", tiny_model, "-p", "hi", "-n", 40, "--temperature", 1, "--seed", 5,
                       "--json-object", *think)
        ok, whole = json_prefix(out["content"])
        assert ok and (whole or out["finish_reason"] == "length"), out
        out = run_json(quill_bin, "run", tiny_model, "-p", "hi", "-n", 40, "--greedy", "--choice", "yes",
                       "--choice", "no way", *think)
        if not think:  # thinking on: the reasoning is free, and a random model may not close it in 40 tokens
            assert out["content"] in ("yes", "no way") or (out["content"] == "" and out["finish_reason"] == "length")
        else:
            assert out["content"] in ("yes", "no way") and out["finish_reason"] == "stop", out
    out = run_json(quill_bin, "run", tiny_model, "--ids", "1,2,3", "-n", 8, "--greedy", "--choice", "alpha beta")
    assert out["content"] == "alpha beta" and out["finish_reason"] == "stop", out


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
          "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer"},
                         "units": {"enum": ["metric", "imperial"]},
                         "alerts": {"type": "array", "maxItems": 2, "items": {"type": ["string", "null"], "maxLength": 5}}}}
# the ends far up, a few whitespace tokens down (random models pad a lot)
QUIET = [a for t, b in (("151643", 30), ("151645", 30), ("198", -5), ("220", -5), ("197", -5), ("256", -5))
         for a in ("--logit-bias", f"{t}={b}")]


def test_json_schema_flag(quill_bin, tiny_model, tmp_path):
    """--json-schema FILE holds the answer (the whole output, or what follows the reasoning) to a
    value valid under the schema: what ends by itself validates with the jsonschema package."""
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    ended = 0
    for seed in range(4):
        out = run_json(quill_bin, "run", tiny_model, "--ids", f"1,2,{seed}", "-n", 160, "--temperature", 1, "--seed", seed,
                       "--json-schema", path, *QUIET)
        if out["finish_reason"] == "stop":
            ended += 1
            jsonschema.validate(json.loads(out["content"]), SCHEMA)
    assert ended >= 3, ended
    out = run_json(quill_bin, "run", tiny_model, "-p", "hi", "--no-think", "-n", 160, "--temperature", 1, "--seed", 1,
                   "--json-schema", path, *QUIET)
    assert out["finish_reason"] == "length" or jsonschema.validate(json.loads(out["content"]), SCHEMA) is None


def test_json_schema_flag_refusals(quill_bin, tiny_model, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]+$"}}}))
    r = run(quill_bin, "run", tiny_model, "-p", "hi", "--json-schema", bad)
    assert r.returncode != 0 and "'pattern'" in r.stderr and "#/properties/zip/pattern" in r.stderr, r.stderr
    broken = tmp_path / "broken.json"
    broken.write_text("{\"type\": ")
    r = run(quill_bin, "run", tiny_model, "-p", "hi", "--json-schema", broken)
    assert r.returncode != 0 and str(broken) in r.stderr, r.stderr
    r = run(quill_bin, "run", tiny_model, "-p", "hi", "--json-schema", tmp_path / "missing.json")
    assert r.returncode != 0 and "missing.json" in r.stderr, r.stderr


def test_streams_text_and_reports_speed(quill_bin, tiny_model):
    r = run(quill_bin, "run", tiny_model, "-p", "Hello", "-n", 8, "--greedy")
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stderr and r.stdout.strip()


@pytest.mark.parametrize("args,needle", [
    (["--ids", "1,2,999999"], "999999"),
    (["--ids", "1,x"], "--ids"),
    (["-p", "hi", "--temperature", "-1"], "--temperature"),
    (["-p", "hi", "--top-p", "0"], "--top-p"),
    (["-p", "hi", "-n", "0"], "-n"),
    (["-p", "hi", "--bogus"], "--bogus"),
    (["-p", "hi", "--logit-bias", "5=101"], "--logit-bias"),
    (["-p", "hi", "--logit-bias", "five=1"], "--logit-bias"),
    (["-p", "hi", "--logit-bias", "999999999=1"], "logit_bias"),
    (["-p", "hi", "--choice"], "--choice"),
    (["-p", "hi", "--json-object", "--choice", "a"], "--choice"),
    (["-p", "hi", "--choice", "a", "--json-schema", "s.json"], "--json-schema"),
    (["-p", "hi", "--json-schema"], "--json-schema"),
])
def test_bad_arguments(quill_bin, tiny_model, args, needle):
    r = run(quill_bin, "run", tiny_model, *args)
    assert r.returncode != 0
    assert needle in r.stderr


def test_bad_model_directories(quill_bin, tiny_model, tmp_path):
    r = run(quill_bin, "run", tmp_path / "nope", "-p", "hi")
    assert r.returncode != 0 and "config.json" in r.stderr
    bad = tmp_path / "llama"
    shutil.copytree(tiny_model, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(cfg))
    r = run(quill_bin, "run", bad, "-p", "hi")
    assert r.returncode != 0 and "llama" in r.stderr.lower()
    trunc = tmp_path / "trunc"
    shutil.copytree(tiny_model, trunc)
    st = trunc / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    r = run(quill_bin, "run", trunc, "-p", "hi")
    assert r.returncode != 0 and "model.safetensors" in r.stderr


def test_prompt_beyond_context(quill_bin, tiny_model, tmp_path):
    small = tmp_path / "short-ctx"
    shutil.copytree(tiny_model, small)
    cfg = json.loads((small / "config.json").read_text())
    cfg["max_position_embeddings"] = 16
    (small / "config.json").write_text(json.dumps(cfg))
    r = run(quill_bin, "run", small, "--ids", ",".join(["100"] * 20))
    assert r.returncode != 0 and "context" in r.stderr
