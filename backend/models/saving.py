"""Saving a model folder (contract 3), LoRA merged into plain SAM weights, and the export to micro-
sam's ``.pt``.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from micro_sam.models.peft_sam import AdaptFormer, AttentionLoRA, FacTSurgery, MLPLoRA, ScaleShiftLayer
from segment_anything.modeling import Sam

from backend.atomic import staging_file, staging_folder
from backend.models.building import ModelError, TRAINING_MODES, _infer_model_type
from backend.models.checkpoints import (
    META_FILE,
    MODEL_FOLDER_FORMAT,
    MODEL_FOLDER_VERSION,
    WEIGHTS_FILE,
    _read_model_folder,
)
from backend.storage import file_sha256


# micro-sam PEFT adapters that are not low-rank updates of a linear weight, so cannot be merged.
_UNMERGEABLE_ADAPTERS = (FacTSurgery, ScaleShiftLayer, AdaptFormer)


def merged_state_dict(sam: Sam) -> dict[str, torch.Tensor]:
    """Plain SAM state dict of ``sam`` (segment_anything key names), with micro-sam LoRA merged in.

    Each micro-sam ``AttentionLoRA`` (from ``PEFT_Sam``/``LoRASurgery``) becomes the plain ``qkv``
    linear layer it computes, ``W_qkv + alpha * [B_q A_q; B_k A_k; B_v A_v]`` (missing parts zero),
    and each ``MLPLoRA`` the plain ``lin1``/``lin2`` with ``W + B A``. ``sam`` is not modified.
    Tensors are detached, on the CPU and contiguous. Other PEFT adapters (FacT, SSF, AdaptFormer)
    cannot be merged and raise ``ModelError``.
    """
    state = sam.state_dict()
    for name, module in sam.named_modules():
        if isinstance(module, _UNMERGEABLE_ADAPTERS):
            raise ModelError(
                f"{name} is a {type(module).__name__} adapter, which cannot be merged into plain SAM weights; "
                "only LoRA fine-tuning can be saved as a model."
            )
        if isinstance(module, AttentionLoRA):
            merged = _merged_attention_lora(module)
        elif isinstance(module, MLPLoRA):
            merged = _merged_mlp_lora(module)
        else:
            continue
        state = {key: value for key, value in state.items() if not key.startswith(f"{name}.")}
        state.update({f"{name}.{key}": value for key, value in merged.items()})
    return {key: value.detach().cpu().contiguous() for key, value in state.items()}


@torch.no_grad()
def _merged_attention_lora(lora: AttentionLoRA) -> dict[str, torch.Tensor]:
    """Weights of the ``nn.Linear`` equal to ``lora`` (AttentionLoRA.forward adds the low-rank
    updates to the q, k and v thirds of the qkv output)."""
    weight = lora.qkv_proj.weight.clone()
    dim = lora.dim
    for part, rows in (("q", slice(0, dim)), ("k", slice(dim, 2 * dim)), ("v", slice(2 * dim, 3 * dim))):
        if hasattr(lora, f"w_a_linear_{part}"):
            down, up = getattr(lora, f"w_a_linear_{part}").weight, getattr(lora, f"w_b_linear_{part}").weight
            weight[rows] += lora.alpha * (up @ down)
    merged = {"weight": weight}
    if lora.qkv_proj.bias is not None:
        merged["bias"] = lora.qkv_proj.bias
    return merged


@torch.no_grad()
def _merged_mlp_lora(lora: MLPLoRA) -> dict[str, torch.Tensor]:
    """Weights of the plain MLP block equal to ``lora`` (each linear layer gets ``+ B A``)."""
    merged = {}
    for index, layer in ((1, lora.mlp_layer.lin1), (2, lora.mlp_layer.lin2)):
        down, up = getattr(lora, f"w_a_linear_{index}").weight, getattr(lora, f"w_b_linear_{index}").weight
        merged[f"lin{index}.weight"] = layer.weight + up @ down
        merged[f"lin{index}.bias"] = layer.bias
    return merged


def save_model_folder(
    sam: Sam,
    folder: str | os.PathLike[str],
    *,
    model_type: str,
    base_model: str,
    mode: str,
    dataset_fingerprint: str | None,
    metrics: dict,
    config: dict,
) -> Path:
    """Write ``sam`` as a model folder (DESIGN.md Contract 3) and return its path.

    ``folder/model.safetensors`` holds ``merged_state_dict(sam)``; ``folder/meta.json`` holds
    ``format``, ``version``, ``model_type``, ``base_model`` (the source it was fine-tuned from),
    ``mode`` (one of ``TRAINING_MODES``), ``dataset_fingerprint``, ``metrics``, ``config`` (both
    JSON-serialisable), ``sha256`` of model.safetensors and ``created`` (ISO 8601, UTC).
    The folder is written next to its destination and renamed into place, replacing an existing
    folder; a failure leaves the previous folder as it was.
    """
    if mode not in TRAINING_MODES:
        raise ValueError(f"unknown training mode '{mode}'; use one of {', '.join(TRAINING_MODES)}")
    state = merged_state_dict(sam)
    found = _infer_model_type(state, "the model to save")
    if found != model_type:
        raise ModelError(f"the model to save is a {found} model, but model_type='{model_type}' was given.")
    folder = Path(folder)
    with staging_folder(folder) as staging:
        weights_path = staging / WEIGHTS_FILE
        safetensors.torch.save_file(state, weights_path)
        meta = {
            "format": MODEL_FOLDER_FORMAT,
            "version": MODEL_FOLDER_VERSION,
            "model_type": model_type,
            "base_model": base_model,
            "mode": mode,
            "dataset_fingerprint": dataset_fingerprint,
            "metrics": metrics,
            "config": config,
            "sha256": file_sha256(weights_path),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2))
    return folder


def export_micro_sam_checkpoint(model_folder: str | os.PathLike[str], output: str | os.PathLike[str]) -> Path:
    """Write the model in ``model_folder`` as a micro-sam checkpoint ``{"model_state": state_dict}``.

    ``micro_sam.util.get_sam_model(model_type=<model_type>, checkpoint_path=output)`` and micro-sam's
    annotator open it. The file is written next to ``output`` and renamed into place. Returns ``output``.
    """
    state, meta = _read_model_folder(Path(model_folder))
    if meta["model_type"] == "tiny":
        raise ModelError(
            f"{model_folder} holds the 'tiny' test architecture, which micro-sam cannot build; "
            "export a vit_t, vit_b, vit_l or vit_h model instead."
        )
    output = Path(output)
    with staging_file(output) as staging:
        torch.save({"model_state": state}, staging)
    return output
