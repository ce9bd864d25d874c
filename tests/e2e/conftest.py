"""Shared fixtures for the end-to-end tests, which drive the real `quill` binary.

- `quill_bin`: path of the binary ($QUILL_BIN, else <root>/build/quill); tests are skipped when it
  has not been built.
- `shared_dir`: the reference data folder ($QUILL_SHARED, else <root>/../shared).
- `tiny_model`, `small_model`: directories holding tiny-qwen3 / small-qwen3 written once per
  session by `quill random-model` (bit-exact per ../shared/spec/random-weights.md; their sha256 is
  checked in test_random_model.py). Treat them as read-only: copy before modifying."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def quill_bin() -> Path:
    path = Path(os.environ.get("QUILL_BIN", ROOT / "build" / "quill"))
    if not path.exists():
        pytest.skip(f"quill binary not found at {path} (build it or set QUILL_BIN)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return Path(os.environ.get("QUILL_SHARED", ROOT.parent / "shared"))


def _random_model(quill_bin: Path, out: Path, preset: str) -> Path:
    r = subprocess.run([str(quill_bin), "random-model", "--preset", preset, str(out)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.fail(f"quill random-model --preset {preset} failed ({r.returncode}):\n{r.stderr}")
    return out


@pytest.fixture(scope="session")
def tiny_model(quill_bin, tmp_path_factory) -> Path:
    return _random_model(quill_bin, tmp_path_factory.mktemp("models") / "tiny-qwen3", "tiny-qwen3")


@pytest.fixture(scope="session")
def small_model(quill_bin, tmp_path_factory) -> Path:
    return _random_model(quill_bin, tmp_path_factory.mktemp("models") / "small-qwen3",
                         "small-qwen3")
