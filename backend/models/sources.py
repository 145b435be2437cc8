"""Loading a model from any source: ``random:<type>``, a micro-sam zoo name, a model folder (local
or in an object store), a checkpoint file.
"""

from __future__ import annotations

import difflib
import json
import os
import warnings
from pathlib import Path

import torch
from segment_anything.modeling import Sam

from backend.models.building import (
    LoadedModel,
    MODEL_TYPES,
    ModelError,
    RANDOM_PREFIX,
    build_sam,
    state_fingerprint,
    _infer_model_type,
    _sam_from_state,
)
from backend.models.checkpoints import (
    META_FILE,
    WEIGHTS_FILE,
    _read_checkpoint_file,
    _read_decoder_file,
    _read_model_folder,
    _read_torch_checkpoint,
)
from backend.storage import Location, StorageError, cached_copy, is_uri, location, unreachable_storage


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
