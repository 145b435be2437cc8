"""Two Ray nodes on this computer: a head and a node joined with ``ray start --address`` (127.0.0.1, token
auth on), one CPU each, so Ray Train can only place a 2-worker run with one worker on each node."""

from __future__ import annotations

import re

import pytest

from backend.config import TrainConfig
from backend.models import load_model
from napari_raysam import auth
from napari_raysam import cluster as clusters
from napari_raysam.runs import MetricsReader, RunClient, RunState
from ray_processes import listening_sockets, state_folder

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A cluster of its own (not the session's): a 1-CPU head and a 1-CPU node, stopped by their processes' ids."""
    with state_folder(tmp_path_factory.mktemp("two_nodes")):
        cluster = clusters.start_local_cluster(num_cpus=1)
        try:
            clusters.add_local_node(cluster, num_cpus=1)
        except BaseException:
            clusters.stop_local_cluster(cluster)
            raise
    yield cluster
    clusters.stop_local_cluster(cluster)


def test_a_run_with_one_worker_per_node_trains_with_ddp_across_the_nodes(two_nodes, cell_dataset, tmp_path):
    config = TrainConfig(
        data=str(cell_dataset), storage=str(tmp_path / "runs"), model="random:tiny", epochs=2, workers=2,
        cpus_per_worker=1, n_objects_per_batch=2, n_sub_iteration=1,
    )
    client = RunClient(two_nodes)
    client.submit(config)
    updates = []
    model = client.wait(config.run_name, on_update=updates.append, poll_s=0.5)

    log = "".join(update.new_log for update in updates)
    nodes = dict(re.findall(r"rank (\d) of 2 on Ray node (\w+)", log))
    assert set(nodes) == {"0", "1"} and nodes["0"] != nodes["1"], log[-3000:]  # one worker on each node
    assert updates[-1].state == RunState.SUCCEEDED
    assert [m["epoch"] for m in MetricsReader(config.run_dir).read()] == [0, 1]  # one record, written by rank 0
    assert load_model(model).meta["mode"] == "decoder"
    # both nodes' processes (two raylets, the workers and the driver included) take connections on loopback only
    listening = listening_sockets(clusters.local_cluster_processes(two_nodes))
    assert [name for _, _, name in listening].count("raylet") >= 2, listening
    assert all(auth.is_loopback_host(ip) for ip, _, _ in listening), listening
