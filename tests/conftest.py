"""Test-wide settings: CPU only, Triton in its interpreter, wandb off, few threads."""

import os
import sysconfig
from pathlib import Path

# Must be set before any @triton.jit function is defined (DESIGN.md environment facts).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny matrices: one thread is fastest there, and two threads spin badly
    when another process holds the second core. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small text corpus (about 0.5 MB of the standard library's Python) for fast runs."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join(p.read_text(errors="ignore") for p in sorted(stdlib.glob("[a-f]*.py"))[:40])
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text)
    return path
