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

Modules: ``building`` (model types, random and tiny SAMs, ``LoadedModel``), ``checkpoints``
(reading weight files), ``sources`` (``load_model`` from any source), ``saving`` (model
folders, LoRA merged, micro-sam's ``.pt``).

The names below load their module (and with it PyTorch) when first used (PEP 562), so the command
line and the docks can name ``ModelError`` without loading PyTorch: ``napari-raysam --help`` took 4.9 s.
"""

from __future__ import annotations

import importlib

from backend.models.errors import ModelError

_MODULE_OF = {
    **dict.fromkeys(("MODEL_TYPES", "RANDOM_PREFIX", "TRAINING_MODES", "LoadedModel", "build_instance_decoder",
                     "build_sam", "set_predictor_image", "state_fingerprint"), "building"),
    **dict.fromkeys(("META_FILE", "WEIGHTS_FILE"), "checkpoints"),
    **dict.fromkeys(("export_micro_sam_checkpoint", "merged_state_dict", "save_model_folder"), "saving"),
    **dict.fromkeys(("check_source", "load_model", "zoo_model_names"), "sources"),
}

__all__ = ["ModelError", *_MODULE_OF]


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'backend.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"backend.models.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # once loaded, a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})
