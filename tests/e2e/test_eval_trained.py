"""Quality tools against transformers + torchao on a really trained small Qwen3
(../shared/models/trained-qwen3.tar.xz, evaluated on held-out Python source): perplexity of the
bf16 model, and after quill's own HQQ and min-max quantization the perplexity, KL divergence and
top-1 agreement, each within the tolerances of ../shared/reference/README.md; plus the greedy
continuations of the three code prompts for all three models.

Slow (three full passes over ~173k tokens on the CPU): marked `slow`, run by the release suite."""
import json
import subprocess
import tarfile

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(quill_bin, shared_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    with tarfile.open(shared_dir / "models" / "trained-qwen3.tar.xz") as tar:
        tar.extractall(root)
    base = root / "trained-qwen3"
    out = {"bf16": base}
    for alg in ("hqq", "minmax"):
        dst = root / alg
        r = subprocess.run([str(quill_bin), "quantize", "--algorithm", alg, str(base), str(dst)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        out[alg] = dst
    return out


@pytest.fixture(scope="module")
def ref(shared_dir):
    return json.loads((shared_dir / "reference" / "trained_ref.json").read_text())


def test_perplexity_kl_top1(quill_bin, shared_dir, trained, ref):
    r = subprocess.run([str(quill_bin), "eval", "compare", str(trained["bf16"]), str(trained["hqq"]),
                        str(trained["minmax"]), "--file", str(shared_dir / "reference" / "eval-python-stdlib.txt"),
                        "--ctx", "512", "--json"], capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    print(json.dumps(got, indent=1))
    base = got["base"]
    for key in ("ppl_all", "ppl_second_half"):
        assert abs(base[key] / ref["bf16"][key] - 1) <= 0.001, (key, base[key], ref["bf16"][key])
    for alg, q in zip(("hqq", "minmax"), got["quants"]):
        want = ref[alg]
        for key in ("ppl_all", "ppl_second_half"):
            assert abs(q["score"][key] / want[key] - 1) <= 0.005, (alg, key, q["score"][key], want[key])
        assert abs(q["kl"] / want["kl"] - 1) <= 0.10, (alg, q["kl"], want["kl"])
        assert abs(q["top1"] - want["top1"]) <= 0.01, (alg, q["top1"], want["top1"])
    # HQQ's point: lower KL than min-max at the same bit width.
    assert got["quants"][0]["kl"] < got["quants"][1]["kl"]


@pytest.mark.parametrize("model", ["bf16", "hqq", "minmax"])
def test_greedy_code_continuations(quill_bin, trained, ref, model):
    for prompt, want in zip(ref["greedy"]["prompts"], ref["greedy"][model]):
        r = subprocess.run([str(quill_bin), "run", str(trained[model]), "-p", prompt, "--raw", "-n", str(len(want)),
                            "--greedy", "--ignore-eos", "--json"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["ids"] == want, (model, prompt)
