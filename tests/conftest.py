"""Shared test set-up: no network, offline Hugging Face, deterministic seeds, small thread pools."""
import os
import socket

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


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
