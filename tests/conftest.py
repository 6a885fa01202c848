"""Test-wide settings: CPU only, Triton in its interpreter, wandb off, few threads."""

import os

# Must be set before any @triton.jit function is defined (DESIGN.md environment facts).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
