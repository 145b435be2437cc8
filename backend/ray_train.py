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

import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from backend.config import TrainConfig
from backend.run_directory import RunDirectory

_STATE_FILE = "state.pt"


def train_loop_per_worker(config_values: dict) -> None:
    """One Ray Train worker: resume if a checkpoint exists, train the remaining epochs, export."""
    # Imported here, in the worker: the driver and Ray Train's controller only pass this function
    # around, and the trainer's imports (PyTorch, segment-anything) cost each process seconds.
    import ray.train.torch

    from backend.training import SamFineTuner, load_state, save_state

    config = TrainConfig.from_dict(config_values)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    run = RunDirectory(config)
    tuner = SamFineTuner(
        config,
        device=ray.train.torch.get_device(),
        rank=rank,
        world_size=world_size,
        progress=run.write_progress,
    )
    run.clock = tuner.elapsed
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start = tuner.load_state(load_state(Path(folder) / _STATE_FILE))
        print(f"rank {rank}: resuming after epoch {start - 1} from {checkpoint.path}", flush=True)
    if rank == 0:
        run.keep_metrics_before(start)
    if start == 0:
        baseline = tuner.validate()  # every rank: validation sums over ranks
        if rank == 0:
            run.write_baseline(*baseline)
    for epoch in range(start, config.epochs):
        record = tuner.run_epoch(epoch)
        if rank != 0:
            ray.train.report(record.to_dict())
        else:
            with tempfile.TemporaryDirectory() as folder:
                save_state(tuner.state(epoch), Path(folder) / _STATE_FILE)
                ray.train.report(record.to_dict(), checkpoint=Checkpoint.from_directory(folder))
            run.append_metrics(record)  # after the checkpoint is stored: a metrics line means the epoch is safe
        if tuner.out_of_time():  # rank 0's answer, broadcast: every rank leaves after the same epoch
            break
    if rank == 0:
        run.export_model(tuner)


def run(config: TrainConfig) -> Path:
    """Train under Ray Train on the cluster this process is connected to; returns the model folder."""
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
            storage_path=str(Path(config.storage).resolve()),  # Ray's folders land in the run dir
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()
    return config.run_dir / "model"
