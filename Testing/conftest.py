"""Shared fixtures: tiny phantom data sets and tiny networks so the whole suite runs in minutes on 2 cores."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_SHAPE = (24, 32, 32)
TINY_PATCH = (16, 32, 32)
TINY_NET = {"channels": [8, 16, 32], "strides": [2, 2], "features": 8, "num_res_units": 1}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A phantom data set folder: 8 train, 2 val, 2 test cases of 24×32×32 voxels."""
    from SSLSegmentLib.data.phantoms import PhantomConfig, write_phantom_dataset

    root = tmp_path_factory.mktemp("phantoms")
    return write_phantom_dataset(root, n_train=8, n_val=2, n_test=2, config=PhantomConfig(shape=TINY_SHAPE), seed=3)


@pytest.fixture
def tiny_net_config():
    from SSLSegmentLib.networks import NetworkConfig

    return NetworkConfig(**TINY_NET)
