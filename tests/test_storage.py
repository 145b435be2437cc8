"""Storage anywhere: runs, datasets and models in an object store (a real S3 server on 127.0.0.1).

The server is moto's, in a process of its own (``tests/s3_server.py``); the Ray test trains with
``s3://`` storage on this session's embedded cluster, follows the run from the store, fetches and
loads its model from there and resumes it.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time

import pytest

from backend.config import TrainConfig
from backend.dataset import open_dataset
from backend.models import build_sam, load_model, save_model_folder
from backend.run_directory import RunDirectory
from backend.storage import (
    UPLOAD_COMPLETE, Location, StorageError, append_line, local_dataset, location, upload_dataset, upload_folder, write_text,
)
from napari_raysam.cli import main
from napari_raysam.runs import MetricsReader, RunClient, RunFailed, RunState, fetch_model, read_progress, run_history
from s3_server import make_bucket, refusing_writes, s3_server


@pytest.fixture(scope="module")
def bucket():
    with s3_server():
        make_bucket("lab")
        yield "s3://lab"


@pytest.fixture(autouse=True)
def download_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_RAYSAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _refuse(*args, **kwargs):
    raise RuntimeError("Could not connect to the endpoint URL")


def test_run_files_in_an_object_store_are_whole_and_a_torn_metrics_line_is_left_out(bucket, tmp_path, capsys):
    config = TrainConfig(data="unused.zarr", storage=f"{bucket}/{tmp_path.name}", model="random:tiny")
    run = RunDirectory(config)
    run.create()
    assert json.loads((config.run_dir / "config.json").read_text())["run_name"] == config.run_name
    for epoch in range(2):
        append_line(config.run_dir / "metrics.jsonl", json.dumps({"epoch": epoch, "val_loss": 1.0, "val_iou": 0.1}))
    reader = MetricsReader(config.run_dir)
    assert [m["epoch"] for m in reader.read()] == [0, 1]
    # a driver killed while writing leaves a torn last line: the resume keeps the whole ones
    text = (config.run_dir / "metrics.jsonl").read_text()
    write_text(config.run_dir / "metrics.jsonl", text + '{"epoch": 2, "val_')
    assert [m["epoch"] for m in run.metrics()] == [0, 1]
    run.restore_metrics(None, 2)  # a resume after epoch 1 from a checkpoint without its own lines
    assert (config.run_dir / "metrics.jsonl").read_text() == text
    checkpointed = [{"epoch": epoch, "val_loss": 1.0, "val_iou": 0.1} for epoch in range(3)]
    run.restore_metrics(checkpointed, 3)  # the checkpoint's lines are the record
    assert [m["epoch"] for m in MetricsReader(config.run_dir).read()] == [0, 1, 2]
    run.write_progress(0, 3, 3)
    assert read_progress(config.run_dir)["step"] == 3
    with pytest.MonkeyPatch.context() as patch:  # the store refuses a write for a moment: the run goes on
        patch.setattr("backend.run_directory.write_text", _refuse)
        run.write_progress(1, 3, 3)
    assert "could not update" in capsys.readouterr().out and read_progress(config.run_dir)["epoch"] == 0
    assert [record.name for record in run_history(config.storage)] == [config.run_name]


def test_a_dataset_is_uploaded_once_by_content_and_downloaded_once_per_machine(bucket, cell_dataset, tmp_path,
                                                                               download_cache, capsys):
    fingerprint = open_dataset(cell_dataset).fingerprint()
    storage = f"{bucket}/{tmp_path.name}"
    uri = upload_dataset(cell_dataset, fingerprint, storage)
    assert uri == f"{storage}/datasets/{fingerprint[:32]}.zarr"
    marker = location(uri) / UPLOAD_COMPLETE
    uploaded_at = marker.stat().st_mtime
    assert main(["upload", str(cell_dataset), "--storage", storage]) == 0  # for a RayJob's --data
    assert capsys.readouterr().out.strip() == uri
    assert marker.stat().st_mtime == uploaded_at  # not uploaded again

    local = local_dataset(uri)
    assert local.is_relative_to(download_cache)
    assert open_dataset(local).fingerprint() == fingerprint
    marker.unlink()  # a cut-off upload is refused, not half-used
    with pytest.raises(StorageError, match="not a complete dataset upload"):
        local_dataset(uri)


def test_a_model_in_the_store_loads_from_its_uri_and_fetch_checks_its_sha256(bucket, tmp_path):
    local = save_model_folder(
        build_sam("tiny"), tmp_path / "model", model_type="tiny", base_model="random:tiny", mode="decoder",
        dataset_fingerprint=None, metrics={}, config={},
    )
    run_dir = location(f"{bucket}/{tmp_path.name}/run-1")
    upload_folder(local, run_dir / "model", last="meta.json")
    original = load_model(local)

    loaded = load_model(str(run_dir))  # the run folder, as the annotator's model field takes it
    assert loaded.fingerprint == original.fingerprint and loaded.source == str(run_dir)
    assert main(["runs", "fetch", "run-1", "--storage", f"{bucket}/{tmp_path.name}", "-o", str(tmp_path / "got")]) == 0
    assert load_model(tmp_path / "got").fingerprint == original.fingerprint

    (run_dir / "model" / "model.safetensors").write_bytes(b"damaged")
    with pytest.raises(StorageError, match="does not match the sha256"):
        fetch_model(run_dir, tmp_path / "got")
    assert load_model(tmp_path / "got").fingerprint == original.fingerprint  # the earlier copy is untouched


@pytest.fixture
def fresh_s3_clients():
    """s3fs keeps one client per set of options, made with the endpoint of its time: ``renew()`` starts anew."""
    from s3fs import S3FileSystem

    yield S3FileSystem.clear_instance_cache
    S3FileSystem.clear_instance_cache()


def test_a_missing_bucket_and_an_unreachable_store_are_said_plainly(
    bucket, cell_dataset, monkeypatch, ray_cluster, fresh_s3_clients
):
    from s3_server import free_port

    config = TrainConfig(data=str(cell_dataset), storage="s3://no-such-bucket/runs", model="random:tiny")
    with pytest.raises(StorageError, match="cannot use the storage s3://no-such-bucket/runs/datasets/.*bucket does not exist"):
        RunClient(ray_cluster).submit(config)  # and no bucket is made in the user's account
    assert not location("s3://no-such-bucket").exists()

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    fresh_s3_clients()
    config = TrainConfig(data=str(cell_dataset), storage="s3://lab/runs", model="random:tiny")
    with pytest.raises(StorageError, match="cannot use the storage s3://lab/runs.*AWS_ENDPOINT_URL"):
        RunClient(ray_cluster).submit(config)


@pytest.mark.ray
def test_a_run_with_object_storage_trains_follows_fetches_and_resumes(bucket, ray_cluster, cell_dataset, tmp_path):
    storage = f"{bucket}/{tmp_path.name}"
    config = TrainConfig(  # through Ray Train: its checkpoints go to the store by its own storage_filesystem
        data=str(cell_dataset), storage=storage, model="random:tiny", epochs=2, n_objects_per_batch=2,
        n_sub_iteration=1, launcher="ray-train",
    )
    client = RunClient(ray_cluster)
    run = client.submit(config)
    assert str(run.run_dir).startswith("s3://lab/")
    updates = []
    model = client.wait(config.run_name, on_update=updates.append, poll_s=0.5)
    assert str(model).startswith("s3://") and [m["epoch"] for m in updates[-1].metrics] == [0, 1]
    assert updates[-1].state == RunState.SUCCEEDED and updates[-1].baseline is not None
    # the dataset went to the store once, by content, and the run read it from there
    datasets = list((location(storage) / "datasets").iterdir())
    assert len(datasets) == 1 and json.loads((config.run_dir / "config.json").read_text())["data"] == str(datasets[0])
    assert load_model(str(model)).meta["mode"] == "decoder"
    assert main(["runs", "fetch", config.run_name, "-o", str(tmp_path / "fetched"),
                 "--address", ray_cluster.dashboard_url, "--token", ray_cluster.token]) == 0
    assert load_model(tmp_path / "fetched").meta["dataset_fingerprint"] == open_dataset(cell_dataset).fingerprint()

    # resume the finished run for two more epochs: it continues from its checkpoint in the store
    resumed = TrainConfig(**{**config.to_dict(), "epochs": 4})
    client.submit(resumed, resume=True)
    client.wait(config.run_name, poll_s=0.5)
    epochs = [m["epoch"] for m in MetricsReader(config.run_dir).read()]
    assert epochs == [0, 1, 2, 3]


@pytest.fixture
def small_disk(tmp_path):
    """A 192 MB disk of its own (a tmpfs) to fill up; skipped where this user may not mount one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small disk here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def _fill(disk) -> None:
    with open(disk / "filler", "wb") as filler:
        with contextlib.suppress(OSError):
            while True:
                filler.write(bytes(1 << 20))
                filler.flush()


def _two_epochs_into_a_run(cluster, dataset, storage: str) -> tuple[RunClient, TrainConfig]:
    """A 12-epoch run submitted with the given storage, once its first two epochs are stored."""
    config = TrainConfig(
        data=str(dataset), storage=storage, model="random:tiny", epochs=12, n_objects_per_batch=2,
        n_sub_iteration=1, max_failures=1,
    )
    client = RunClient(cluster)
    client.submit(config)
    metrics = MetricsReader(config.run_dir)
    deadline = time.monotonic() + 300
    while len(metrics.read()) < 2:
        assert time.monotonic() < deadline, "no two epochs finished"
        time.sleep(0.2)
    return client, config


def _assert_refused_plainly(failed: RunFailed, config: TrainConfig, reason: str) -> list[int]:
    """The run failed saying which storage refused what and why, with its epochs kept; returns them."""
    said = str(failed)
    assert re.match(
        rf"run '{config.run_name}' failed: the storage {config.run_dir} refused to store .*\(.*{reason}.*\)\. "
        "Free space there or give write access back; the dataset and the epochs stored before are intact\n",
        said,
    ), said[:2000]
    assert f"continue it with `napari-raysam runs resume {config.run_name}`" in said
    kept = [m["epoch"] for m in MetricsReader(config.run_dir).read()]
    assert len(kept) >= 2 and kept == list(range(len(kept)))  # every line whole, none twice
    return kept


def _resume_for_two_more_epochs(client: RunClient, config: TrainConfig, kept: list[int]) -> Location:
    """Resume the run for two epochs after ``kept``: from its newest whole checkpoint, every epoch recorded once."""
    resumed = TrainConfig(**{**config.to_dict(), "epochs": len(kept) + 2})
    client.submit(resumed, resume=True)
    model = client.wait(config.run_name, poll_s=0.5)
    assert [m["epoch"] for m in MetricsReader(config.run_dir).read()] == list(range(len(kept) + 2))
    return model


@pytest.mark.ray
def test_a_disk_that_fills_up_mid_run_fails_it_plainly_and_resume_continues_once_there_is_room(
    ray_cluster, cell_dataset, small_disk
):
    client, config = _two_epochs_into_a_run(ray_cluster, cell_dataset, str(small_disk / "runs"))
    _fill(small_disk)
    with pytest.raises(RunFailed) as failed:
        client.wait(config.run_name, poll_s=0.5)
    kept = _assert_refused_plainly(failed.value, config, "No space left on device")

    (small_disk / "filler").unlink()  # room again; a checkpoint cut off by the full disk is passed over
    model = _resume_for_two_more_epochs(client, config, kept)
    assert load_model(model).meta["mode"] == "decoder"


@pytest.mark.ray
def test_an_object_store_that_refuses_writes_mid_run_fails_it_plainly_and_resume_continues(
    bucket, ray_cluster, cell_dataset, tmp_path
):
    client, config = _two_epochs_into_a_run(ray_cluster, cell_dataset, f"{bucket}/{tmp_path.name}")
    with refusing_writes(), pytest.raises(RunFailed) as failed:
        client.wait(config.run_name, poll_s=0.5)  # following only reads: it goes on while writes are refused
    kept = _assert_refused_plainly(failed.value, config, "minimum free drive threshold")
    _resume_for_two_more_epochs(client, config, kept)  # the uploaded dataset and the stored checkpoints are whole
