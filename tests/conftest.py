"""Shared test set-up: offline, deterministic, few threads (the CI machine has 2 cores)."""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
