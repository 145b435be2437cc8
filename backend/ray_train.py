"""Ray Train around the plain-PyTorch fine-tuner: workers, checkpoints, resume.

``run(config)`` is called by the job's driver process (``python -m backend train``)
inside a Ray job; it starts ``config.workers`` TorchTrainer workers, each running
``SamFineTuner`` on its shard. Rank 0 writes ``metrics.jsonl``, ``progress.json`` and,
last, the model folder (contract 2). Every epoch a checkpoint is reported to Ray Train;
after a worker failure Ray restarts the group (up to ``max_failures`` times) and the
workers resume from the latest checkpoint.

The job's driver and Ray Train's controller import this module but never PyTorch: each is a
process of its own on the way to the first step, and ``import torch`` costs it seconds. So
PyTorch is imported in the worker function only, and a one-worker run, which needs no
process group, uses Ray Train's plain data-parallel trainer instead of ``TorchTrainer``
(whose config imports PyTorch in the driver and the controller).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from backend.config import TrainConfig
from backend.cpu_priority import use_reserved_cpus
from backend.failures import said_errors
from backend.run_directory import RunDirectory
from backend.storage import Location, StorageError, ray_storage, refused_write

_STATE_FILE = "state.pt"


def train_loop_per_worker(config_values: dict) -> None:
    """One Ray Train worker: resume from the newest stored checkpoint, train the remaining epochs, export."""
    # Imported here, in the worker: the driver and Ray Train's controller only pass this function
    # around, and the trainer's imports (PyTorch, segment-anything) cost each process seconds.
    import ray.train.torch
    import torch

    from backend.training import SamFineTuner, save_state

    config = TrainConfig.from_dict(config_values)
    use_reserved_cpus(config.cpus_per_worker)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    # Ray's node id, not Ray Train's node rank: that groups workers by IP, and nodes may share one
    node = ray.get_runtime_context().get_node_id()[:12]
    print(f"rank {rank} of {world_size} on Ray node {node} (PyTorch threads: {torch.get_num_threads()})", flush=True)
    run = RunDirectory(config)
    tuner = SamFineTuner(
        config,
        device=ray.train.torch.get_device(),
        rank=rank,
        world_size=world_size,
        progress=run.write_progress,
    )
    run.clock = tuner.elapsed
    start, checkpointed = 0, None
    latest = _latest_stored_state(run)
    if latest is not None:
        where, state = latest
        start, checkpointed = tuner.load_state(state), state.get("metrics")
        print(f"rank {rank}: resuming after epoch {start - 1} from {where}", flush=True)
    metrics = run.restore_metrics(checkpointed, start) if rank == 0 else []
    if start == 0:
        baseline = tuner.validate()  # every rank: validation sums over ranks
        if rank == 0:
            run.write_baseline(*baseline)
    for epoch in range(start, config.epochs):
        record = tuner.run_epoch(epoch)
        if rank != 0:
            ray.train.report(record.to_dict())
        else:
            metrics.append(record.to_dict())
            with tempfile.TemporaryDirectory() as folder:  # the epoch lines travel with the checkpoint
                save_state({**tuner.state(epoch), "metrics": metrics}, Path(folder) / _STATE_FILE)
                with run.storing(f"epoch {epoch}'s checkpoint"):  # Ray Train uploads it into the run folder
                    ray.train.report(record.to_dict(), checkpoint=Checkpoint.from_directory(folder))
            run.append_metrics(record)  # after the checkpoint is stored: a metrics line means the epoch is safe
        if tuner.out_of_time():  # rank 0's answer, broadcast: every rank leaves after the same epoch
            break
    if rank == 0:
        run.export_model(tuner)


def _latest_stored_state(run: RunDirectory) -> tuple[Location, dict] | None:
    """The newest epoch state stored in the run's checkpoint folders, or None for a run that has none.

    Not ``ray.train.get_checkpoint()``: Ray Train's controller registers a checkpoint a moment after
    the worker has stored it, so a driver killed in between leaves a stored epoch that Ray does not
    know, and a resume would start that run over. The folders themselves are the record; they are
    named by time (``checkpoint_<date>_<time>``), and one whose state cannot be read (cut off while
    being stored) gives way to the one before it.
    """
    from backend.training import load_state  # in the worker, which has imported it anyway

    for folder in sorted(run.path.glob("checkpoint_*"), key=lambda folder: folder.name, reverse=True):
        try:
            return folder, load_state(folder / _STATE_FILE)
        except Exception:  # missing or torn: torch raises RuntimeError, an object store its own errors
            continue
    return None


def run(config: TrainConfig) -> Location:
    """Train under Ray Train on the cluster this process is connected to; returns the model folder."""
    storage_path, storage_filesystem = ray_storage(config.storage)  # Ray's folders land in the run dir
    run_dir = RunDirectory(config)
    run_dir.create()
    if config.workers > 1:  # gradients are averaged over a torch.distributed process group
        from ray.train.torch import TorchTrainer as Trainer
    else:  # one worker: no process group, so no PyTorch in this process nor in Ray Train's controller
        Trainer = DataParallelTrainer
    trainer = Trainer(
        train_loop_per_worker,
        train_loop_config=config.to_dict(),
        scaling_config=ScalingConfig(
            num_workers=config.workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as error:
        said = _said_failure(error, run_dir)
        if said is None:
            raise
        raise said from error
    return config.run_dir / "model"


def _said_failure(error: ray.train.TrainingFailedError, run_dir: RunDirectory) -> Exception | None:
    """The error that ended a Ray Train run in its own words (``backend.failures.said_errors``: a storage
    that refused a write, a model or dataset that cannot be read), else None.

    Ray Train reports a worker's exception wrapped with its traceback (``_base_exc``, the one way
    to reach it in Ray 2.x) and its controller's own failure apart; a controller that cannot
    write its checkpoint records into the run folder fails with a plain OSError.
    """
    for failure in getattr(error, "worker_failures", {}).values():
        cause = getattr(failure, "_base_exc", failure)
        if isinstance(cause, said_errors()):
            return cause
    controller = getattr(error, "controller_failure", None)
    if isinstance(controller, OSError):
        return StorageError(refused_write(str(run_dir.path), "Ray Train's checkpoint records", controller))
    return None
