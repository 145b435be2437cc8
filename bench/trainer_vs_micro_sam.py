"""Our trainer (1 worker, no Ray) vs micro-sam's ``train_sam``: same data, model, settings.

Both train vit_t (random weights, written once as a micro-sam checkpoint so ``train_sam``
can read it offline) in full mode on the same 512 x 512 crops of the real HeLa frames,
with micro-sam's defaults for prompting (8 sub-iterations) and bf16 autocast on the CPU
(``train_sam`` always trains with mixed precision), denormal floats flushed to zero on both sides
(our trainer flushes them; set here first, micro-sam's first run would compute them and every later
run of both in this thread would not). Only training steps are timed: the
first steps of each run are a warm-up, validation is excluded on both sides. Runs
alternate (micro-sam, ours, micro-sam, ours) so drift in the machine's speed hits both.

    .venv/bin/python bench/trainer_vs_micro_sam.py [--steps 6] [--objects 10]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from backend.config import TrainConfig
from backend.dataset import open_dataset
from backend.dataset.crops import TrainingCrops
from backend.denormals import flush_denormals
from backend.models import build_sam, export_micro_sam_checkpoint, save_model_folder
from common import hela_dataset, machine, training_samples_per_s

WARMUP = 2


def micro_sam_samples_per_s(data: Path, checkpoint: Path, args, work: Path) -> float:
    """Samples/s of micro-sam's ``train_sam`` over its training steps after the warm-up."""
    from micro_sam.training import SamTrainer, train_sam

    step_ends: list[float] = []
    original = SamTrainer._interactive_train_iteration

    def timed(self, x, y):
        result = original(self, x, y)
        step_ends.append(time.perf_counter())  # the backward of step k ends before step k+1 starts
        return result

    dataset = open_dataset(data)
    crops = TrainingCrops(dataset, "train", patch_shape=(512, 512), length=args.steps + WARMUP, seed=1)
    val = TrainingCrops(dataset, "val", patch_shape=(512, 512), length=1, seed=2)
    SamTrainer._interactive_train_iteration = timed
    try:
        train_sam(
            name="bench", model_type="vit_t", train_loader=DataLoader(crops, batch_size=1, shuffle=True),
            val_loader=DataLoader(val, batch_size=1), n_iterations=args.steps + WARMUP, early_stopping=None,
            n_objects_per_batch=args.objects, checkpoint_path=str(checkpoint), with_segmentation_decoder=False,
            device="cpu", lr=1e-5, n_sub_iteration=8, save_root=str(work), verify_n_labels_in_loader=None,
        )
    finally:
        SamTrainer._interactive_train_iteration = original
    # consecutive forward ends are one full step apart; the last warm-up step's end starts the clock
    timed = step_ends[WARMUP - 1:]
    return (len(timed) - 1) / (timed[-1] - timed[0])


def our_samples_per_s(data: Path, model_folder: Path, args, work: Path) -> float:
    """Samples/s of ``SamFineTuner`` in full mode over the steps after the warm-up."""
    config = TrainConfig(
        data=str(data), storage=str(work), model=str(model_folder), mode="full", epochs=1, lr=1e-5,
        samples_per_epoch=args.steps + WARMUP, n_objects_per_batch=args.objects, n_sub_iteration=8,
        precision="bf16", patch_shape=(512, 512),
    )
    return training_samples_per_s(config, warmup=WARMUP, steps=args.steps)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run (after 2 warm-up steps)")
    parser.add_argument("--objects", type=int, default=10, help="objects per batch (micro-sam default 25)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    flush_denormals()
    print(machine())
    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    data = hela_dataset(work / "data")
    model_folder = save_model_folder(
        build_sam("vit_t"), work / "vit_t_random", model_type="vit_t", base_model="random:vit_t",
        mode="full", dataset_fingerprint=None, metrics={}, config={},
    )
    checkpoint = export_micro_sam_checkpoint(model_folder, work / "vit_t_random.pt")
    theirs, ours = [], []
    for repeat in range(args.repeats):
        theirs.append(micro_sam_samples_per_s(data, checkpoint, args, work / f"micro_sam_{repeat}"))
        ours.append(our_samples_per_s(data, model_folder, args, work / f"ours_{repeat}"))
        print(f"run {repeat + 1}: micro-sam train_sam {theirs[-1]:.4f} samples/s, ours {ours[-1]:.4f} samples/s")
    result = {
        "machine": machine(), "steps": args.steps, "objects_per_batch": args.objects, "threads": torch.get_num_threads(),
        "micro_sam_samples_per_s": theirs, "ours_samples_per_s": ours,
        "ratio_ours_over_micro_sam": sum(ours) / sum(theirs),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
