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
"""

from backend.models.building import (
    MODEL_TYPES,
    RANDOM_PREFIX,
    TRAINING_MODES,
    LoadedModel,
    ModelError,
    build_instance_decoder,
    build_sam,
    set_predictor_image,
    state_fingerprint,
)
from backend.models.checkpoints import META_FILE, WEIGHTS_FILE
from backend.models.saving import export_micro_sam_checkpoint, merged_state_dict, save_model_folder
from backend.models.sources import check_source, load_model, zoo_model_names

__all__ = [
    "META_FILE", "MODEL_TYPES", "RANDOM_PREFIX", "TRAINING_MODES", "WEIGHTS_FILE", "LoadedModel", "ModelError",
    "build_instance_decoder", "build_sam", "check_source", "export_micro_sam_checkpoint", "load_model", "merged_state_dict",
    "save_model_folder", "set_predictor_image", "state_fingerprint", "zoo_model_names",
]
