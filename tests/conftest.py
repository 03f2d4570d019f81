"""Shared test set-up: no network, offline Hugging Face, deterministic seeds, small thread pools."""
import atexit
import os
import shutil
import socket
import tempfile

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Builds take the kernels' default schedules: no tuning unless a test asks, and never the user's tuning database.
os.environ["SPARSEC_TUNE_SECONDS"] = "0"
os.environ["SPARSEC_TUNE_MAX_LOAD"] = "1000"  # the tests that tune record what they time beside the other workers
_TUNING_DIR = tempfile.mkdtemp(prefix="sparsec-tests-")
atexit.register(shutil.rmtree, _TUNING_DIR, ignore_errors=True)
os.environ["SPARSEC_TUNING_DB"] = os.path.join(_TUNING_DIR, "tuning.json")


def _no_network(*args, **kwargs):
    raise RuntimeError("network access attempted in a test")


socket.socket.connect = _no_network
socket.create_connection = _no_network
socket.getaddrinfo = _no_network


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
