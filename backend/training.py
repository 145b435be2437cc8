"""Plain-PyTorch SAM fine-tuning: micro-sam's iterative prompting recipe, or the fast decoder recipe.

With ``recipe="fast"`` (decoder mode's default) a step is ``backend.fast_recipe``'s: many
objects of one image in one batched decoder pass, losses on the decoder's logit grid.
With ``recipe="micro-sam"`` one optimisation step is micro-sam's own: ``SamTrainer._interactive_train_iteration``
(a point or box start, corrective points sampled from the error, previous mask logits
fed back with probability ``mask_prob``, loss = Dice + IoU-prediction MSE), driven here
by a loop that Ray Train (``backend.ray_train``) or a plain process can run. Nothing
in this module imports Ray, and micro-sam's training modules are imported only for its
recipe (``backend.micro_sam_recipe``): the fast recipe's workers start seconds sooner.

Data parallelism averages gradients with one ``all_reduce`` per optimiser step instead
of wrapping the model in DDP: iterative prompting calls the mask decoder several times
per step and multimask/single-mask rounds leave different parameters unused, which
DDP's reducer does not support.
"""

from __future__ import annotations

import io
import math
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from segment_anything import SamPredictor
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from backend.config import TrainConfig
from backend import fast_recipe
from backend.dataset import Dataset, open_dataset
from backend.dataset.crops import TrainingCrops
from backend.denormals import flush_denormals
from backend.embedding_cache import EmbeddingCache
from backend.models import LoadedModel, load_model, set_predictor_image
from backend.run_directory import RunDirectory
from backend.storage import Location, local_dataset, write_bytes

if TYPE_CHECKING:
    from micro_sam.training.sam_trainer import SamTrainer
    from micro_sam.training.trainable_sam import TrainableSAM

ProgressCallback = Callable[[int, int, int], None]
"""progress(epoch, step, steps_per_epoch), called on rank 0 after every optimiser step."""

@dataclass(frozen=True)
class EpochRecord:
    """One line of ``metrics.jsonl`` (contract 2)."""

    epoch: int
    train_loss: float
    val_loss: float
    val_iou: float
    lr: float
    samples_per_s: float
    elapsed_s: float

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def resolve_device(config: TrainConfig) -> torch.device:
    """The device a single worker trains on: the first GPU when ``use_gpu``, else the CPU."""
    if config.use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("use_gpu is set but PyTorch sees no GPU here; drop --gpu or run on a GPU node")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    if config.precision == "fp32" or (config.precision == "auto" and device.type != "cuda"):
        return None
    if config.precision in ("auto", "bf16"):
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16 if config.precision == "auto" else None
        return torch.bfloat16
    return torch.float16


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block with fixed numpy/python/torch (CPU and CUDA) RNG state; restore the outer state after."""
    states = (np.random.get_state(), random.getstate())
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda_devices):
        np.random.seed(seed)
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            np.random.set_state(states[0])
            random.setstate(states[1])


class SamFineTuner:
    """Fine-tunes one SAM model on one worker (rank) of a possibly distributed run.

    Lifecycle: construct (loads model and data; decoder mode takes each embedding from the
    dataset, else from the storage's embedding cache, else computes and caches it),
    optionally ``load_state`` to resume, then ``run_epoch`` for each epoch, then
    ``best_sam`` for the model to export. With ``world_size > 1`` a torch.distributed
    process group must already be initialised (Ray Train does it).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        device: torch.device | None = None,
        rank: int = 0,
        world_size: int = 1,
        progress: ProgressCallback | None = None,
    ) -> None:
        # first, before any parallel PyTorch operation starts its threads: they inherit the setting
        flush_denormals()
        self.config = config
        self._elapsed_before = 0.0  # training time of earlier attempts of this run (resume)
        self.embeddings_computed = 0
        """Image-encoder passes this fine-tuner made (0 when every embedding came from the dataset or cache)."""
        self.device = device or resolve_device(config)
        self.rank, self.world_size = rank, world_size
        self.progress = progress
        self.dataset: Dataset = open_dataset(local_dataset(config.data))  # an upload: downloaded once per machine
        self.train_ids = self.dataset.require_objects("train")
        self.val_ids = self.dataset.require_objects("val")
        self.loaded: LoadedModel = load_model(config.model, device=self.device)

        torch.manual_seed(config.seed)  # identical LoRA initialisation on every rank
        sam = self.loaded.sam
        if config.mode == "lora":
            from micro_sam.models.peft_sam import PEFT_Sam

            sam = PEFT_Sam(sam, rank=config.lora_rank).sam
        elif config.mode == "decoder":
            for param in sam.image_encoder.parameters():
                param.requires_grad = False
        self.sam = sam.to(self.device)
        """The SAM being trained (LoRA attached in LoRA mode)."""
        self.trainable = [p for p in sam.parameters() if p.requires_grad]
        if world_size > 1:
            for param in sam.parameters():
                dist.broadcast(param.data, src=0)

        # fused: one kernel over all parameters instead of a dozen small ops per tensor (the vit_t
        # decoder has 126): a fast-recipe step on one CPU thread 0.239 -> 0.218 s (docs/BENCHMARKS.md)
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=config.learning_rate, weight_decay=config.weight_decay,
            fused=self.device.type in ("cpu", "cuda"),
        )
        self.autocast_dtype = _autocast_dtype(config, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        self.iteration = 0
        """Micro-batches trained so far (over all epochs); micro-sam's step picks its prompts by it."""
        self.model: TrainableSAM | None = None
        """micro-sam's wrapper of ``sam`` and ``step`` its trainer: micro-sam's recipe only, else None."""
        self.step: SamTrainer | None = None
        if config.recipe == "micro-sam":
            from backend.micro_sam_recipe import micro_sam_step, trainable_sam

            self.model = trainable_sam(sam, config.mode)
            self.step = micro_sam_step(self.model, self.optimizer, self.device, config)
        self._my_val_ids = self.val_ids[rank::world_size]
        self._labels: dict[str, torch.Tensor] = {}
        if config.mode == "decoder":
            # every rank takes the same number of images (wrapping around), so collectives stay in step
            per_rank = math.ceil(len(self.train_ids) / world_size)
            self._my_train_ids = [
                self.train_ids[(rank + k * world_size) % len(self.train_ids)] for k in range(per_rank)
            ]
            self._cache = EmbeddingCache(config.storage, self.loaded.encoder_fingerprint)
            self._embeddings = {
                sample_id: self._embed(sample_id) for sample_id in dict.fromkeys(self._my_train_ids + self._my_val_ids)
            }
            self.loader = None
            micro_batches = len(self._my_train_ids)
            if config.recipe == "fast":
                self._prepared = {
                    sample_id: fast_recipe.prepare_image(embedding, self.dataset.labels(sample_id), self.device)
                    for sample_id, (embedding, _) in self._embeddings.items()
                }
                micro_batches = self._fast_images_per_epoch
        else:
            crops = TrainingCrops(
                self.dataset, "train", patch_shape=config.patch_shape, min_objects=config.min_objects,
                length=config.samples_per_epoch, seed=config.seed,
            )
            sampler = (
                DistributedSampler(crops, num_replicas=world_size, rank=rank, seed=config.seed)
                if world_size > 1 else RandomSampler(crops)
            )
            self.loader = DataLoader(
                crops, batch_size=config.batch_size, sampler=sampler, num_workers=config.loader_workers,
                pin_memory=self.device.type == "cuda",
            )
            micro_batches = len(self.loader)
        per_step = config.batch_size if config.mode == "decoder" else 1
        self.steps_per_epoch = max(1, math.ceil(micro_batches / (per_step * config.grad_accumulation)))
        self._budget_used = 0.0
        """Share of the time budget trained at the last optimiser step (0 without one): the schedule follows it."""
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.best: dict = {"val_iou": -math.inf, "epoch": -1, "state": None}
        self._val_prompts = self._sample_val_prompts() if config.recipe == "micro-sam" else {}
        # the time budget counts training, not the set-up: embeddings are computed once and then cached
        self._started = time.perf_counter()

    # -- schedule -------------------------------------------------------------------------
    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, then constant or a cosine decay to 0 over the run.

        The run is its epochs or its time budget, whichever ends it first: a budgeted run (``--minutes``,
        with epochs only a cap) anneals by its last minute, where a cosine over the epoch cap would leave
        the learning rate at its peak until the clock stops it.
        """
        config = self.config
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        if config.lr_schedule == "constant":
            return 1.0
        total = max(1, self.steps_per_epoch * config.epochs - config.warmup_steps)
        done = max((step - config.warmup_steps) / total, self._budget_used)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    # -- data -----------------------------------------------------------------------------
    def _embed(self, sample_id: str) -> tuple[torch.Tensor, tuple[int, int]]:
        """(1, 256, 64, 64) embedding of a whole image and SAM's input size: from the dataset, the cache, or computed.

        Computed ones are rounded to float16 like stored ones, so a cached rerun trains on the same values.
        """
        stored = self.dataset.embedding(sample_id, self.loaded.encoder_fingerprint)
        if stored is not None:
            array, attrs = stored
            return torch.from_numpy(array.astype(np.float32))[None].to(self.device), tuple(attrs["input_size"])
        pixels = self.dataset.sam_image(sample_id)
        cached = self._cache.get(pixels)
        if cached is None:
            predictor = SamPredictor(self.sam)
            with self._autocast():
                set_predictor_image(predictor, pixels)
            self.embeddings_computed += 1
            cached = (predictor.features[0].float().cpu().numpy().astype(np.float16), tuple(predictor.input_size))
            self._cache.put(pixels, *cached)
        array, input_size = cached
        return torch.from_numpy(array.astype(np.float32))[None].to(self.device), input_size

    def _whole_image(self, sample_id: str, with_pixels: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A (1, 3, H, W) image batch and its (1, 1, H, W) labels (kept in memory after the first read)."""
        if sample_id not in self._labels:
            self._labels[sample_id] = torch.from_numpy(self.dataset.labels(sample_id).astype(np.float32))[None, None]
        labels = self._labels[sample_id]
        height, width = labels.shape[-2:]
        if with_pixels:
            image = torch.from_numpy(self.dataset.sam_image(sample_id))[None]
        else:  # decoder mode needs only the image's shape: a zero-stride view costs no memory
            image = torch.zeros(1).expand(1, 3, height, width)
        return image, labels

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _train_micro_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, str | None]]:
        if self.loader is not None:
            if isinstance(self.loader.sampler, DistributedSampler):
                self.loader.sampler.set_epoch(epoch)
            self.loader.dataset.set_epoch(epoch)
            for x, y in self.loader:
                yield x, y, None
            return
        order = list(self._my_train_ids)
        random.Random(self.config.seed * 100_003 + epoch * 101 + self.rank).shuffle(order)
        for sample_id in order:
            x, y = self._whole_image(sample_id, with_pixels=False)
            yield x, y, sample_id

    # -- one epoch ------------------------------------------------------------------------
    def run_epoch(self, epoch: int) -> EpochRecord:
        """Train one epoch, validate, and return the epoch's metrics reduced over all ranks."""
        start = time.perf_counter()
        self.sam.train()
        if self.config.mode == "decoder":
            self.sam.image_encoder.eval()
        accumulate = self.config.grad_accumulation * (self.config.batch_size if self.loader is None else 1)
        loss_sum, micro_count, samples, step = 0.0, 0, 0, 0
        self.optimizer.zero_grad(set_to_none=True)
        micro_steps = self._fast_micro_steps if self.config.recipe == "fast" else self._micro_sam_micro_steps
        for loss, count in micro_steps(epoch, accumulate):
            self.iteration += 1
            loss_sum += loss
            micro_count += 1
            samples += count
            if micro_count % accumulate == 0:
                step = self._optimizer_step(epoch, step)
                if self._budget_used >= 1:  # the share this step took: rank 0's on every rank
                    break
        if micro_count % accumulate:
            self._optimizer_step(epoch, step)
        train_seconds = time.perf_counter() - start
        lr = self.optimizer.param_groups[0]["lr"]
        val_loss, val_iou = self.validate()
        totals = self._sum_over_ranks([loss_sum, micro_count, samples])
        speeds = self._sum_over_ranks([train_seconds])
        record = EpochRecord(
            epoch=epoch,
            train_loss=totals[0] / max(totals[1], 1),
            val_loss=val_loss,
            val_iou=val_iou,
            lr=lr,
            samples_per_s=totals[2] / max(speeds[0] / self.world_size, 1e-9),
            elapsed_s=time.perf_counter() - start,
        )
        if record.val_iou > self.best["val_iou"]:  # backend.run_directory.kept_epoch's rule
            self.best = {"val_iou": record.val_iou, "epoch": epoch, "state": self._trainable_state()}
        return record

    def _micro_sam_micro_steps(self, epoch: int, accumulate: int) -> Iterator[tuple[float, int]]:
        """micro-sam's step on each micro-batch (forward and backward); yields (loss, samples)."""
        for x, y, sample_id in self._train_micro_batches(epoch):
            if sample_id is not None:
                self.model.step_embeddings = self._embeddings[sample_id]
            self.step._iteration = self.iteration
            with self._autocast():
                loss = self.step._interactive_train_iteration(x, y)[0]
            self.scaler.scale(loss / accumulate).backward()
            yield float(loss.detach()), x.shape[0]

    def _fast_micro_steps(self, epoch: int, accumulate: int) -> Iterator[tuple[float, int]]:
        """The fast recipe on one image per micro-batch (forward and backward); yields (loss, objects)."""
        generator = torch.Generator(self.device).manual_seed(self.config.seed * 100_003 + epoch * 101 + self.rank)
        order = fast_recipe.epoch_order(len(self._my_train_ids), self._fast_images_per_epoch, generator.initial_seed())
        for index in order:
            with self._autocast():
                yield fast_recipe.train_image(
                    self.sam, self._prepared[self._my_train_ids[index]], n_objects=self.config.n_objects_per_batch,
                    rounds=self.config.n_sub_iteration, generator=generator, loss_scale=1 / accumulate,
                    mask_prob=self.config.mask_prob,
                )

    @property
    def _fast_images_per_epoch(self) -> int:
        images = self.config.samples_per_epoch or max(len(self.train_ids), fast_recipe.MIN_IMAGES_PER_EPOCH)
        return math.ceil(images / self.world_size)

    # -- time budget ----------------------------------------------------------------------
    def elapsed(self) -> float:
        """Seconds this run has trained (since its set-up ended: model, data, embeddings), over all its attempts."""
        return self._elapsed_before + time.perf_counter() - self._started

    def budget_used(self) -> float:
        """Share of ``minutes`` trained so far (0 without a budget). Every rank gets rank 0's figure, so all
        take the same learning rate and stop at the same step."""
        if self.config.minutes is None:
            return 0.0
        used = self.elapsed() / (self.config.minutes * 60)
        if self.world_size > 1:
            shared = torch.tensor([used], dtype=torch.float64, device=self.device)
            dist.broadcast(shared, src=0)
            used = float(shared.item())
        return used

    def out_of_time(self) -> bool:
        """Whether ``minutes`` has passed (rank 0's answer on every rank)."""
        return self.budget_used() >= 1

    def _optimizer_step(self, epoch: int, step: int) -> int:
        """Average gradients over ranks, update, report progress; returns the step count after it."""
        if self.world_size > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.trainable]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.world_size
            offset = 0
            for param in self.trainable:
                param.grad = flat[offset:offset + param.numel()].view_as(param).clone()
                offset += param.numel()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._budget_used = self.budget_used()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.progress is not None and self.rank == 0:
            self.progress(epoch, step + 1, self.steps_per_epoch)
        return step + 1

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def _sample_val_prompts(self) -> dict[str, tuple[list[dict], list, bool]]:
        """Prompts for every val image, drawn once: the same each epoch, and micro-sam's negative-point
        sampling (mask dilations on the CPU, seconds per object on large images) is paid only here."""
        prompts = {}
        with _seeded(self.config.seed + 7919):
            for index, sample_id in enumerate(self._my_val_ids):
                x, y = self._whole_image(sample_id, with_pixels=False)
                n_pos, n_neg, boxes, multimask = self.step._get_prompt_and_multimasking_choices_for_val(index)
                inputs, ids = self.step.convert_inputs(x, y, n_pos, n_neg, boxes, self.config.n_objects_per_batch)
                for record in inputs:
                    del record["image"]
                prompts[sample_id] = (inputs, ids, multimask)
        return prompts

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        """Mean loss and mean object IoU on the val split (whole images), same prompts every epoch.

        micro-sam recipe: prompts cycle as in micro-sam's validation: single point, box, points,
        box + points; IoU is that of the mask the model ranks best against the true object.
        Fast recipe: every object once with its box and once with its single centre point, as
        evaluation prompts them, scored on the logit grid; the loss and IoU average both.
        """
        self.sam.eval()
        if self.config.recipe == "fast":
            sums = [0.0, 0.0, 0.0, 0]
            for sample_id in self._my_val_ids:
                sums = [a + b for a, b in zip(sums, fast_recipe.validate_image(self.sam, self._prepared[sample_id]))]
            loss, box_iou, point_iou, objects = self._sum_over_ranks(sums)
            return loss / max(objects, 1), (box_iou + point_iou) / 2 / max(objects, 1)
        loss_sum, iou_sum, objects = 0.0, 0.0, 0
        for sample_id, (prompts, ids, multimask) in self._val_prompts.items():
            x, y = self._whole_image(sample_id, with_pixels=self.config.mode != "decoder")
            inputs = [{**record, "image": image} for record, image in zip(prompts, x)]
            inputs, y_one_hot = self.step._preprocess_batch(inputs, y, ids)
            if self.config.mode == "decoder":
                self.model.step_embeddings = self._embeddings[sample_id]
            with self._autocast():
                embeddings, inputs = self.model.image_embeddings_oft(inputs)
                outputs = self.model(inputs, embeddings, multimask_output=multimask)
                loss = self.step._compute_loss(outputs, y_one_hot)[0]
            output = outputs[0]
            best = output["iou_predictions"].float().argmax(dim=1)
            masks = output["masks"][torch.arange(len(best)), best][:, None].float()
            iou = self.step._compute_iou(torch.sigmoid(masks), y_one_hot[0])
            loss_sum += float(loss)
            iou_sum += float(iou.sum())
            objects += len(iou)
        images = len(self._my_val_ids)
        totals = self._sum_over_ranks([loss_sum, images, iou_sum, objects])
        return totals[0] / max(totals[1], 1), totals[2] / max(totals[3], 1)

    # -- state ----------------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        names = {id(p): n for n, p in self.sam.named_parameters()}
        return {names[id(p)]: p.detach().cpu().clone() for p in self.trainable}

    def state(self, epoch: int) -> dict:
        """Everything needed to resume after ``epoch``: tensors and plain values only (weights_only loadable)."""
        return {
            "epoch": epoch,
            "elapsed_s": self.elapsed(),
            "iteration": self.iteration,
            "trainable": self._trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "best_val_iou": self.best["val_iou"],
            "best_epoch": self.best["epoch"],
            "best": self.best["state"],
        }

    def load_state(self, state: dict) -> int:
        """Restore a ``state()``; returns the first epoch still to train."""
        self.sam.load_state_dict(state["trainable"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = state["iteration"]
        self._elapsed_before = state.get("elapsed_s", 0.0)  # states written before the time budget lack it
        self._started = time.perf_counter()
        # a state from before the kept epoch was chosen by val IoU lacks it: the next epoch replaces its best
        self.best = {"val_iou": state.get("best_val_iou", -math.inf), "epoch": state["best_epoch"], "state": state["best"]}
        return state["epoch"] + 1

    def best_sam(self):
        """The model with the weights of the epoch with the highest val IoU (LoRA still attached)."""
        if self.best["state"] is not None:
            self.sam.load_state_dict(self.best["state"], strict=False)
        return self.sam


def save_state(state: dict, path: Location) -> None:
    """Write a resume state atomically (a local path or an object-store location)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getvalue())


def load_state(path: Location) -> dict:
    with path.open("rb") as file:
        return torch.load(io.BytesIO(file.read()), map_location="cpu", weights_only=True)


def train(
    config: TrainConfig,
    *,
    resume: bool = True,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> Location:
    """Fine-tune in this process, without Ray, and return the exported model folder.

    Writes the run directory like a Ray run; the per-epoch resume state goes to
    ``<run>/resume_state.pt`` and is picked up when the same run is started again. With
    ``config.minutes`` training ends at the first optimiser step past the budget; that
    epoch is validated and the best epoch's model exported.
    """
    run = RunDirectory(config)
    run.create()
    tuner = SamFineTuner(config, progress=run.write_progress)
    run.clock = tuner.elapsed
    state_path = run.path / "resume_state.pt"
    state = load_state(state_path) if resume and state_path.exists() else None
    start = tuner.load_state(state) if state is not None else 0
    if state is not None:
        print(f"resuming after epoch {start - 1} from {state_path}", flush=True)
    metrics = run.restore_metrics(state.get("metrics") if state is not None else None, start)
    if start == 0:
        run.write_baseline(*tuner.validate())
    for epoch in range(start, config.epochs):
        record = tuner.run_epoch(epoch)
        metrics.append(record.to_dict())
        with run.storing(f"epoch {epoch}'s checkpoint"):  # the epoch lines travel with it
            save_state({**tuner.state(epoch), "metrics": metrics}, state_path)
        run.append_metrics(record)
        if on_epoch is not None:
            on_epoch(record)
        if tuner.out_of_time():
            break
    return run.export_model(tuner)
