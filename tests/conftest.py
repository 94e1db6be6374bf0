"""Shared tiny fixtures: a 16x16 UNet of the real architecture and small real-data files."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# pytest-xdist (pyproject's addopts) runs one worker a core: each worker, and the CLIs and sites it starts
# (OMP_NUM_THREADS), gets its share of the cores instead of every worker fighting over all of them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, os.cpu_count() or 1) // _WORKERS)
torch.set_num_threads(_THREADS)
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))

TINY = dict(image_size=16, channels=1, num_classes=10, block_out_channels=(8, 16), layers_per_block=1,
            attention_head_dim=8, norm_num_groups=4)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """The tests that start Ray or a SuperLink and SuperNodes (marked slow) run on one worker, one after another:
    two Flower runs at once would share ports and both cores."""
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.xdist_group("flower"))


def tiny_generator(seed: int = 0):
    from sapf.engine.model import DiffusionModel, build_scheduler, build_unet

    torch.manual_seed(seed)
    return DiffusionModel(build_unet(**TINY), build_scheduler())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from sapf.engine.model import save_generator

    d = tmp_path_factory.mktemp("tiny_model")
    save_generator(tiny_generator(), d)
    return d


@pytest.fixture(scope="session")
def mnist_small_npz(tmp_path_factory):
    """120 real MNIST digits (12 a class) as an .npz of uint8 28x28 images."""
    from sapf.engine.data import load_dataset

    ds = load_dataset("mnist5k", 28, 1)
    idx = np.concatenate([np.flatnonzero(ds.labels == k)[:12] for k in range(10)])
    images = ((ds.images[idx, 0] + 1) * 127.5).round().astype(np.uint8)
    path = tmp_path_factory.mktemp("data") / "mnist_small.npz"
    np.savez(path, images=images, labels=ds.labels[idx])
    return path


@pytest.fixture
def flower_identity():
    """The run/node/task identity Flower sets around a ClientApp call (handlers called directly need it)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None
