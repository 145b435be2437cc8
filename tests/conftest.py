"""Shared fixtures: small synthetic datasets, loopback-only Ray, an isolated state folder."""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from unittest import mock

import pytest
import torch

from backend.dataset import write_samples
from backend.models import build_sam
from ray_processes import state_folder
from synthetic import cell_samples

# Every Ray port on 127.0.0.1 (see DESIGN.md); set before any test starts Ray.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def cell_dataset(tmp_path_factory) -> Path:
    """A 3-train / 1-val dataset of (3, 128, 128) synthetic cell images, 6 cells each."""
    path = tmp_path_factory.mktemp("data") / "cells.zarr"
    write_samples(
        path,
        cell_samples(3, "train", seed=1, shape=(128, 128), n_cells=6)
        + cell_samples(1, "val", seed=2, shape=(128, 128), n_cells=6),
    )
    return path


@pytest.fixture(scope="session")
def decoder_state() -> OrderedDict:
    """A random micro-sam instance segmentation decoder for the tiny model, made as micro-sam's
    ``export_instance_segmentation_model`` does: the UNETR's entries other than ``encoder.*``."""
    from micro_sam.instance_segmentation import get_unetr

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unetr = get_unetr(build_sam("tiny").image_encoder, device="cpu")
    return OrderedDict((key, value) for key, value in unetr.state_dict().items() if not key.startswith("encoder"))


@pytest.fixture(scope="session")
def decoder_model(tmp_path_factory, decoder_state) -> str:
    """Path of a micro-sam ``.pt`` of the tiny model carrying ``decoder_state``, as micro-sam writes it."""
    path = tmp_path_factory.mktemp("models") / "tiny_lm.pt"
    torch.save({"model_state": OrderedDict(build_sam("tiny").state_dict()), "decoder_state": decoder_state}, path)
    return str(path)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """This test session's own Ray head on 127.0.0.1 (2 CPUs), stopped by its processes' ids.

    Started from a shell that sets ``OMP_NUM_THREADS`` to the machine's cores, as HPC environments
    do: Ray's processes inherit it, and each run must still use the CPUs it reserved."""
    from napari_raysam import cluster as clusters

    with state_folder(tmp_path_factory.mktemp("ray_state")), mock.patch.dict(os.environ, OMP_NUM_THREADS="2"):
        cluster = clusters.start_local_cluster(num_cpus=2)
    yield cluster
    clusters.stop_local_cluster(cluster)


@pytest.fixture(autouse=True)
def isolated_state(tmp_path, monkeypatch):
    """Keep napari-raysam's state folder (local cluster record, token) per test."""
    monkeypatch.setenv("NAPARI_RAYSAM_HOME", str(tmp_path / "state"))
