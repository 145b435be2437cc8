"""Reading weight files without unpickling: model folders, safetensors, micro-sam ``.pt`` and SAM
``.pth``.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from backend.models.building import MODEL_TYPES, ModelError
from backend.storage import file_sha256


MODEL_FOLDER_FORMAT = "napari-raysam/model"


MODEL_FOLDER_VERSION = 1


WEIGHTS_FILE = "model.safetensors"


META_FILE = "meta.json"


def _read_model_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a Contract 3 model folder: ``(state_dict, meta)``, after checking the weights' sha256."""
    meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
    if not (meta_path.is_file() and weights_path.is_file()):
        raise ModelError(
            f"{folder} is not a model folder: it needs {META_FILE} and {WEIGHTS_FILE} (written at the end "
            "of a fine-tuning run, in <run>/model/). Pass the model folder itself or a checkpoint file."
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelError(f"{meta_path} is not valid JSON ({error}): the model folder is damaged.") from error
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FOLDER_FORMAT:
        raise ModelError(f"{meta_path} does not describe a napari-raysam model (format '{MODEL_FOLDER_FORMAT}').")
    if meta.get("version") != MODEL_FOLDER_VERSION:
        raise ModelError(
            f"{folder} is a version {meta.get('version')} model folder; this napari-raysam reads version "
            f"{MODEL_FOLDER_VERSION}. Update napari-raysam."
        )
    if meta.get("model_type") not in MODEL_TYPES:
        raise ModelError(f"{meta_path} names model type '{meta.get('model_type')}'; expected one of {MODEL_TYPES}.")
    if file_sha256(weights_path) != meta.get("sha256"):
        raise ModelError(
            f"{weights_path} does not match the sha256 recorded in {meta_path}: the file is corrupt or was "
            "modified. Copy the model folder again from the run directory."
        )
    return _read_safetensors(weights_path), meta


def _read_checkpoint_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """``(sam_state, decoder_state)`` of a checkpoint file; only micro-sam ``.pt`` files carry a decoder."""
    if path.suffix == ".safetensors":
        return _read_safetensors(path), None
    return _read_torch_checkpoint(path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except (safetensors.SafetensorError, OSError) as error:
        raise ModelError(f"cannot read {path} as safetensors ({error}); it is damaged or of another format.") from error


def _read_torch_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """``(sam_state, decoder_state)`` of a SAM ``.pth`` (plain state dict) or micro-sam ``.pt``, never unpickling.

    micro-sam files hold ``{"model_state": ..., "decoder_state": ...}`` (other entries are ignored): the
    SAM state, possibly with ``sam.`` key prefixes from training, which are removed, and optionally the
    state dict of its instance segmentation decoder (the UNETR's entries other than ``encoder.*``, as
    micro-sam's ``export_instance_segmentation_model`` and ``export_custom_sam_model`` write it).
    ``decoder_state`` is None when the file has none.
    """
    checkpoint = _torch_load(path)
    decoder_state = None
    if isinstance(checkpoint, Mapping) and "model_state" in checkpoint:
        decoder_state = checkpoint.get("decoder_state")
        if decoder_state is not None and not _is_tensor_mapping(decoder_state):
            raise ModelError(
                f"{path} holds a 'decoder_state' that is not a mapping of names to tensors; it is damaged "
                "or not a micro-sam checkpoint. Export the model again with micro-sam."
            )
        checkpoint = checkpoint["model_state"]
    if not _is_tensor_mapping(checkpoint):
        raise ModelError(
            f"{path} holds no SAM state dict: expected a mapping of names to tensors, or micro-sam's "
            "{'model_state': ...}."
        )
    state = {key.removeprefix("sam."): value for key, value in checkpoint.items()}
    return state, (dict(decoder_state) if decoder_state is not None else None)


def _read_decoder_file(path: Path) -> dict[str, torch.Tensor]:
    """The decoder state dict in a micro-sam zoo ``<name>_decoder`` file (a plain state dict), never unpickling."""
    decoder_state = _torch_load(path)
    if not _is_tensor_mapping(decoder_state):
        raise ModelError(
            f"{path} holds no decoder state dict (a mapping of names to tensors): it is damaged. Delete it "
            "so that micro-sam's cache downloads it again."
        )
    return dict(decoder_state)


def _torch_load(path: Path) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU; ModelError for a file that is damaged or needs unpickling."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # torch's safe loader met something other than plain weights
        raise _unpickling_refusal(path, error) from error
    except Exception as error:  # torch.load raises anything from KeyError to RuntimeError on a damaged file
        raise ModelError(f"cannot read {path} as a PyTorch checkpoint ({type(error).__name__}: {error}).") from error


def _is_tensor_mapping(value: object) -> bool:
    return isinstance(value, Mapping) and all(isinstance(tensor, torch.Tensor) for tensor in value.values())


_REEXPORT_HINT = (
    "re-export it as plain weights where it was made, e.g. with torch.save(model.state_dict(), 'weights.pth') "
    "or safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')."
)


def _unpickling_refusal(path: Path, error: pickle.UnpicklingError) -> ModelError:
    """The ModelError for a file that ``torch.load(weights_only=True)`` rejected."""
    message = str(error)
    found_global = re.search(r"GLOBAL ([\w.]+)", message)  # torch names the object it refused
    if found_global:
        return ModelError(
            f"refusing to unpickle {path}: it holds Python objects besides tensors ({found_global.group(1)}), "
            f"and loading those could run arbitrary code; {_REEXPORT_HINT}"
        )
    # Torch cannot tell a damaged file from an unsupported pickle instruction, so name both.
    found_reason = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:\n\n|$)", message, re.DOTALL)
    reason = f" ({found_reason.group(1)})" if found_reason else ""
    return ModelError(
        f"cannot read {path} without unpickling arbitrary objects{reason}: it is damaged, not a PyTorch "
        f"checkpoint, or needs full unpickling, which napari-raysam refuses. If it is a checkpoint, {_REEXPORT_HINT}"
    )
