"""micro-sam's own training step, for ``recipe="micro-sam"`` only.

``micro_sam.training`` pulls in torch_em, elf and scikit-learn (about 4.5 s of imports on a
2-core machine, paid by every training worker); the fast recipe (decoder mode's default)
needs none of it, so ``backend.training`` imports this module only for micro-sam's recipe.
"""

from __future__ import annotations

import torch
from micro_sam.training.sam_trainer import SamTrainer
from micro_sam.training.trainable_sam import TrainableSAM
from micro_sam.training.util import ConvertToSamInputs
from segment_anything.modeling import Sam

from backend.config import TrainConfig

_BOX_DISTORTION = 0.025  # micro-sam's train_sam default


class PrecomputedEmbeddingSAM(TrainableSAM):
    """TrainableSAM whose image embeddings for the next step are set by the caller.

    Decoder mode computes every embedding once; micro-sam's step asks the model for them
    through ``image_embeddings_oft``, so this hands back the stored ones instead.
    """

    step_embeddings: tuple[torch.Tensor, tuple[int, int]] | None = None

    def image_embeddings_oft(self, batched_inputs):
        embeddings, input_size = self.step_embeddings
        for record in batched_inputs:
            record["input_size"] = input_size
        return embeddings, batched_inputs


def trainable_sam(sam: Sam, mode: str) -> TrainableSAM:
    """micro-sam's trainable wrapper of ``sam``: one fed precomputed embeddings in decoder mode."""
    return (PrecomputedEmbeddingSAM if mode == "decoder" else TrainableSAM)(sam)


def micro_sam_step(
    model: TrainableSAM, optimizer: torch.optim.Optimizer, device: torch.device, config: TrainConfig
) -> SamTrainer:
    """micro-sam's trainer, used for its step only: its torch_em loaders, logger and checkpointing stay unused."""
    return SamTrainer(
        convert_inputs=ConvertToSamInputs(transform=model.transform, box_distortion_factor=_BOX_DISTORTION),
        n_sub_iteration=config.n_sub_iteration,
        n_objects_per_batch=config.n_objects_per_batch,
        mask_prob=config.mask_prob,
        name="napari-raysam",
        train_loader=None,
        val_loader=None,
        model=model,
        optimizer=optimizer,
        device=device,
        logger=None,
        mixed_precision=False,
    )
