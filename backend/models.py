"""Model factory and checkpoint I/O: build SAM, load it from any supported source, save and export it.

Model sources (``load_model``):

- ``random:<model_type>``: random weights, built in memory (tests, demos, machines without weights);
- a micro-sam zoo name (``vit_b_lm``, ``vit_t``, ...): read from micro-sam's cache, downloaded there
  first when online;
- a model folder (DESIGN.md Contract 3: ``model.safetensors`` + ``meta.json``), or its URI in an object
  store (``s3://bucket/runs/<run>/model``, or the run folder), downloaded once into the local cache;
- a checkpoint file: ``.safetensors``, a micro-sam ``.pt`` or an original SAM ``.pth``.

micro-sam ``.pt`` files and zoo models may also carry micro-sam's instance segmentation decoder
(``decoder_state``); ``build_instance_decoder`` makes it a module for automatic segmentation.

Nothing here unpickles: weights are read with safetensors or ``torch.load(weights_only=True)``, so a
checkpoint that needs arbitrary Python objects is refused before any of its code can run.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
from micro_sam.models.peft_sam import AdaptFormer, AttentionLoRA, FacTSurgery, MLPLoRA, ScaleShiftLayer
from segment_anything import SamPredictor, sam_model_registry

from backend.atomic import staging_file, staging_folder
from backend.storage import (
    Location, StorageError, cached_copy, file_sha256, is_uri, location, unreachable_storage,
)
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

MODEL_TYPES: tuple[str, ...] = ("vit_t", "vit_b", "vit_l", "vit_h", "tiny")
TRAINING_MODES: tuple[str, ...] = ("decoder", "full", "lora")

MODEL_FOLDER_FORMAT = "napari-raysam/model"
MODEL_FOLDER_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"

RANDOM_PREFIX = "random:"

# Image encoder width of the "tiny" test configuration; it also identifies tiny checkpoints.
TINY_EMBED_DIM = 32
# ViT image encoders are told apart by the width of their patch embedding (as micro-sam does).
_VIT_TYPE_BY_EMBED_DIM = {TINY_EMBED_DIM: "tiny", 768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
# MobileSAM's TinyViT encoder (vit_t) has a convolutional patch embedding instead.
_TINY_VIT_PATCH_KEY = "image_encoder.patch_embed.seq.0.c.weight"
_VIT_PATCH_KEY = "image_encoder.patch_embed.proj.weight"

# micro-sam PEFT adapters that are not low-rank updates of a linear weight, so cannot be merged.
_UNMERGEABLE_ADAPTERS = (FacTSurgery, ScaleShiftLayer, AdaptFormer)


class ModelError(ValueError):
    """A model cannot be built, loaded, saved or exported; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A SAM model ready for inference, with where it came from.

    ``sam`` is a ``segment_anything.modeling.Sam`` (for ``vit_t`` MobileSAM's ``Sam``, which has the
    same interface) on the requested device, in eval mode. ``fingerprint`` is
    ``state_fingerprint`` of its whole state dict, ``encoder_fingerprint`` that of the
    ``image_encoder.*`` entries only (image embeddings depend on nothing else). ``meta`` is the
    ``meta.json`` content for a model folder, ``{}`` for every other source.
    """

    sam: Sam
    model_type: str
    source: str
    fingerprint: str
    encoder_fingerprint: str
    meta: dict
    # micro-sam's instance segmentation decoder (its UNETR decoder's state dict, CPU tensors) when the
    # source carries one (micro-sam .pt files, zoo *_lm / *_em_organelles models); not in ``fingerprint``.
    decoder_state: dict[str, torch.Tensor] | None = dataclasses.field(default=None, repr=False)


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def build_sam(model_type: str, seed: int = 0) -> Sam:
    """Build a SAM model of ``model_type`` (one of ``MODEL_TYPES``) with random weights.

    The weights depend only on ``seed``; the global torch RNG is left untouched. The model is on
    the CPU, in eval mode, and maps a ``(B, 3, 1024, 1024)`` float image to ``(B, 256, 64, 64)``
    image embeddings like every SAM.
    """
    if model_type not in MODEL_TYPES:
        raise ModelError(f"unknown model type '{model_type}'; use one of {', '.join(MODEL_TYPES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model_type == "tiny":
            sam = _build_tiny_sam()
        elif model_type == "vit_t":
            sam = _mobile_sam_registry()["vit_t"](checkpoint=None)
        else:
            sam = sam_model_registry[model_type](checkpoint=None)
    return sam.eval()


def _mobile_sam_registry() -> dict:
    # Imported on first use: mobile_sam (needed for vit_t only) floods the log with timm warnings.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mobile_sam import sam_model_registry as mobile_sam_registry
    return mobile_sam_registry


def _build_tiny_sam() -> Sam:
    """SAM with a 2-block, 32-wide image encoder and a 1-layer decoder transformer.

    Prompt encoder and decoder keep SAM's 256 channels and the 64 x 64 embedding grid, so
    everything downstream of the image encoder sees the shapes of a real SAM.
    """
    image_size, patch_size, prompt_dim = 1024, 16, 256
    grid_size = image_size // patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size,
            patch_size=patch_size,
            embed_dim=TINY_EMBED_DIM,
            depth=2,
            num_heads=2,
            mlp_ratio=4,
            out_chans=prompt_dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=8,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(grid_size, grid_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=prompt_dim, mlp_dim=256, num_heads=8),
            transformer_dim=prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_model(source: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedModel:
    """Load a SAM model from ``source`` (see the module docstring for the forms) onto ``device``.

    Raises ``ModelError`` with a message naming the fix for every source that cannot be loaded:
    unknown name, missing path, corrupt model folder, checkpoint that needs unpickling, checkpoint
    of another architecture, zoo model not cached while offline.
    """
    source = os.fspath(source)
    sam, model_type, meta, decoder_state = _resolve_source(source)
    state = sam.state_dict()
    encoder_state = {key: value for key, value in state.items() if key.startswith("image_encoder.")}
    return LoadedModel(
        sam=sam.to(device).eval(),
        model_type=model_type,
        source=source,
        fingerprint=state_fingerprint(state),
        encoder_fingerprint=state_fingerprint(encoder_state),
        meta=meta,
        decoder_state=decoder_state,
    )


def check_source(source: str, *, offline: bool = False) -> None:
    """Check that ``source`` names a model :func:`load_model` can open, without reading weights.

    Args:
        offline: also require a micro-sam model name to be in micro-sam's cache (nothing to download).

    Raises:
        ModelError: the same plain message :func:`load_model` would give.
    """
    source = str(source)
    if source.startswith(RANDOM_PREFIX):
        if source[len(RANDOM_PREFIX):] not in MODEL_TYPES:
            raise ModelError(
                f"unknown model type in '{source}'; use one of " + ", ".join(RANDOM_PREFIX + t for t in MODEL_TYPES)
            )
        return
    if is_uri(source):
        _remote_model_folder(source)
        return
    path = Path(source).expanduser()
    if path.exists():
        return
    if any(char in source for char in "/\\.~"):
        raise ModelError(f"no file or folder at {path.absolute()}. {_VALID_SOURCES}")
    names = zoo_model_names(cached_only=offline)
    if source not in names:
        state = "downloaded (in micro-sam's cache)" if offline and source in zoo_model_names() else "known"
        raise ModelError(f"'{source}' is not a {state} micro-sam model, a file or a folder. {_VALID_SOURCES}")


def _resolve_source(source: str) -> tuple[Sam, str, dict, dict[str, torch.Tensor] | None]:
    """Build the CPU model for ``source``: returns ``(sam, model_type, meta, decoder_state)``."""
    if source.startswith(RANDOM_PREFIX):
        model_type = source[len(RANDOM_PREFIX):]
        if model_type not in MODEL_TYPES:
            raise ModelError(
                f"unknown model type '{model_type}' in '{source}'; use one of "
                + ", ".join(RANDOM_PREFIX + name for name in MODEL_TYPES)
            )
        return build_sam(model_type), model_type, {}, None

    # Paths before zoo names: telling zoo names apart needs micro_sam.util, which imports napari.
    path = local_model_copy(source) if is_uri(source) else Path(source).expanduser()
    if path.is_dir():
        state, meta = _read_model_folder(path)
        return _sam_from_state(state, meta["model_type"], f"model folder {path}"), meta["model_type"], meta, None
    if path.is_file():
        state, decoder_state = _read_checkpoint_file(path)
        model_type = _infer_model_type(state, f"checkpoint {path}")
        return _sam_from_state(state, model_type, f"checkpoint {path}"), model_type, {}, decoder_state
    if any(char in source for char in "/\\.~"):  # zoo names have none of these; this was meant as a path
        raise ModelError(f"no file or folder at {path.absolute()}. {_VALID_SOURCES}")

    names = zoo_model_names()
    if source not in names:
        close = difflib.get_close_matches(source, names, n=3)
        hint = f" Did you mean {' or '.join(repr(name) for name in close)}?" if close else ""
        raise ModelError(
            f"'{source}' is not a file, a folder or a micro-sam model name.{hint} {_VALID_SOURCES} "
            f"micro-sam model names: {', '.join(names)}."
        )
    zoo = _zoo()
    path = _cached_zoo_checkpoint(zoo, source, f"micro-sam model '{source}'")
    state, decoder_state = _read_torch_checkpoint(path)
    # micro-sam keeps a zoo model's decoder in a file of its own, "<name>_decoder", read with the model.
    # Optional: training never needs it, and without it automatic segmentation uses the point grid.
    decoder_name = f"{source}_decoder"
    if decoder_name in zoo.registry:
        try:
            decoder_path = _cached_zoo_checkpoint(
                zoo, decoder_name, f"the instance segmentation decoder of micro-sam model '{source}'"
            )
        except ModelError as error:
            warnings.warn(f"{error} Until then automatic segmentation uses the point grid.", stacklevel=2)
        else:
            decoder_state = _read_decoder_file(decoder_path)
    model_type = _infer_model_type(state, f"micro-sam model '{source}' ({path})")
    return _sam_from_state(state, model_type, f"micro-sam model '{source}' ({path})"), model_type, {}, decoder_state


def _remote_model_folder(uri: str) -> tuple[Location, dict]:
    """``(location, meta)`` of the model folder at ``uri`` in an object store (a run folder gives its ``model/``)."""
    try:
        folder = location(uri)
        if not (folder / META_FILE).exists() and (folder / "model" / META_FILE).exists():
            folder = folder / "model"
        return folder, json.loads((folder / META_FILE).read_text())
    except FileNotFoundError:
        raise ModelError(f"no model folder at {uri}: it needs {META_FILE} and {WEIGHTS_FILE}. {_VALID_SOURCES}") from None
    except Exception as error:  # botocore's connection and credential errors are not OSErrors
        raise ModelError(unreachable_storage(uri, error)) from error


def local_model_copy(uri: str) -> Path:
    """The model folder at ``uri`` (object store) on this machine: downloaded once into the cache, by its sha256.

    The copy's weights are checked against ``meta.json`` when it is loaded, as any model folder's.
    """
    folder, meta = _remote_model_folder(uri)
    try:
        return cached_copy(folder, "models", str(meta.get("sha256", "unknown"))[:32])
    except (OSError, StorageError) as error:
        raise ModelError(f"cannot download the model at {uri}: {error}") from error


_VALID_SOURCES = (
    "A model source is a micro-sam model name (e.g. vit_b_lm), a model folder (meta.json + "
    "model.safetensors, on this disk or at an s3:// / gs:// URI), a .safetensors / micro-sam .pt / SAM .pth file, or random:<type> with <type> "
    f"one of {', '.join(MODEL_TYPES)}."
)


def _zoo():
    """micro-sam's model registry (a ``pooch.Pooch``), rebuilt so MICROSAM_CACHEDIR is honoured."""
    # Imported on first use: micro_sam.util imports napari when it is installed.
    from micro_sam.util import models

    return models()


def zoo_model_names(cached_only: bool = False) -> list[str]:
    """micro-sam's model names (``vit_b_lm``, ``vit_t``, ...); with ``cached_only``, only those in its cache."""
    zoo = _zoo()
    # The "*_decoder" entries are micro-sam's instance segmentation decoders, not SAM models.
    names = [name for name in zoo.registry if not name.endswith("_decoder")]
    return [name for name in names if (zoo.abspath / name).is_file()] if cached_only else names


def _cached_zoo_checkpoint(zoo, name: str, what: str) -> Path:
    """Path of zoo file ``name`` in micro-sam's cache, downloading it there if it is missing.

    ``what`` names the file in the error, e.g. "micro-sam model 'vit_b_lm'".
    """
    path = zoo.abspath / name  # pooch stores each file under its registry name, without extension
    if path.is_file():
        return path
    try:
        return Path(zoo.fetch(name, progressbar=False))
    except (OSError, ValueError) as error:  # requests' errors are OSErrors; pooch's hash check raises ValueError
        raise ModelError(
            f"{what} is not in micro-sam's cache and could not be downloaded ({error}). "
            f"On a machine with internet access download {zoo.urls[name]} and save it as the file "
            f"'{name}' (exactly this name, no extension) in the folder {path.parent}. That folder is "
            "<cache>/models where <cache> is $MICROSAM_CACHEDIR when set (else micro-sam's default cache); "
            "set MICROSAM_CACHEDIR to use another folder."
        ) from error


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


def _infer_model_type(state: Mapping[str, torch.Tensor], origin: str) -> str:
    """The SAM architecture that ``state`` was saved from, told by its image encoder's patch embedding."""
    if _TINY_VIT_PATCH_KEY in state:
        return "vit_t"
    if _VIT_PATCH_KEY in state:
        width = state[_VIT_PATCH_KEY].shape[0]
        if width in _VIT_TYPE_BY_EMBED_DIM:
            return _VIT_TYPE_BY_EMBED_DIM[width]
        raise ModelError(
            f"{origin} has a ViT image encoder of width {width}, which matches no supported SAM architecture "
            f"(widths: {', '.join(f'{name} {dim}' for dim, name in _VIT_TYPE_BY_EMBED_DIM.items())}; "
            "vit_t is MobileSAM)."
        )
    raise ModelError(
        f"{origin} is not a SAM checkpoint: it has no image encoder patch embedding ({_VIT_PATCH_KEY} or "
        f"{_TINY_VIT_PATCH_KEY}). Supported architectures: {', '.join(MODEL_TYPES)}."
    )


def _sam_from_state(state: Mapping[str, torch.Tensor], model_type: str, origin: str) -> Sam:
    """A ``model_type`` SAM holding ``state``; ModelError when the state is of another architecture."""
    sam = build_sam(model_type)
    expected = sam.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    reshaped = [
        f"{key} {tuple(state[key].shape)} instead of {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    findings = {"missing tensors": missing, "unexpected tensors": unexpected, "tensors of another shape": reshaped}
    problems = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})" for what, keys in findings.items() if keys]
    if problems:
        raise ModelError(
            f"{origin} looks like a {model_type} checkpoint but does not fit the {model_type} architecture: "
            f"{'; '.join(problems)}. It is a checkpoint of another architecture or a damaged file."
        )
    sam.load_state_dict(state)
    return sam


def build_instance_decoder(model: LoadedModel, device: str | torch.device = "cpu") -> torch.nn.Module | None:
    """micro-sam's instance segmentation decoder of ``model`` on ``device``; None if it carries none.

    The module is ``micro_sam.instance_segmentation.get_decoder``'s ``DecoderAdapter``: it maps the
    ``(1, 256, 64, 64)`` image embeddings of ``model.sam`` to foreground, center distance and boundary
    distance maps, for ``InstanceSegmentationWithDecoder``. Raises ModelError when ``decoder_state``
    does not fit micro-sam's decoder.
    """
    if model.decoder_state is None:
        return None
    # Imported on first use: micro_sam.instance_segmentation imports micro_sam.util, which imports napari.
    from micro_sam.instance_segmentation import get_decoder

    try:
        # Left in the train mode get_decoder returns (BatchNorm uses the image's own statistics): micro-sam's
        # annotator and automatic_instance_segmentation run it so, and results should match theirs.
        return get_decoder(model.sam.image_encoder, model.decoder_state, device)
    except RuntimeError as error:  # micro-sam's check for missing tensors, or load_state_dict's for shapes
        raise ModelError(
            f"the instance segmentation decoder in {model.source} does not fit micro-sam's decoder ({error}); "
            "it is damaged or from an incompatible micro-sam version. Export the model again with micro-sam, "
            "or use a checkpoint without 'decoder_state' (automatic segmentation then uses the point grid)."
        ) from error


# ---------------------------------------------------------------------------------------------
# Fingerprints, saving, export
# ---------------------------------------------------------------------------------------------


def set_predictor_image(predictor: SamPredictor, image: np.ndarray) -> None:
    """Embed a ``(3, H, W)`` float image in [0, 255] (numpy) into ``predictor``, once for all its prompts.

    segment-anything's own steps (longest side to 1024, normalise, pad, encode) through
    ``set_torch_image``, which keeps the float intensities; ``set_image`` would need an 8-bit
    ``(H, W, 3)`` copy.
    """
    tensor = torch.as_tensor(image, dtype=torch.float32, device=predictor.device)[None]
    predictor.set_torch_image(predictor.transform.apply_image_torch(tensor), image.shape[1:])


def state_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 hex digest of a state dict: for each key in sorted order, the key, dtype, shape and the
    tensor's raw bytes (CPU, contiguous). Equal weights give equal fingerprints on any device."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


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
