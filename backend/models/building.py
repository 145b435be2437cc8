"""Building SAM: the model types, random weights, the tiny test configuration, what a loaded model
carries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from collections.abc import Mapping
from functools import partial

import numpy as np
import torch
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from backend.models.attention import chunk_global_attention
from backend.models.errors import ModelError


MODEL_TYPES: tuple[str, ...] = ("vit_t", "vit_b", "vit_l", "vit_h", "tiny")


TRAINING_MODES: tuple[str, ...] = ("decoder", "full", "lora")


RANDOM_PREFIX = "random:"


# Image encoder width of the "tiny" test configuration; it also identifies tiny checkpoints.
TINY_EMBED_DIM = 32


# ViT image encoders are told apart by the width of their patch embedding (as micro-sam does).
_VIT_TYPE_BY_EMBED_DIM = {TINY_EMBED_DIM: "tiny", 768: "vit_b", 1024: "vit_l", 1280: "vit_h"}


# MobileSAM's TinyViT encoder (vit_t) has a convolutional patch embedding instead.
_TINY_VIT_PATCH_KEY = "image_encoder.patch_embed.seq.0.c.weight"


_VIT_PATCH_KEY = "image_encoder.patch_embed.proj.weight"


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


def build_sam(model_type: str, seed: int = 0) -> Sam:
    """Build a SAM model of ``model_type`` (one of ``MODEL_TYPES``) with random weights.

    The weights depend only on ``seed``; the global torch RNG is left untouched. The model is on
    the CPU, in eval mode, and maps a ``(B, 3, 1024, 1024)`` float image to ``(B, 256, 64, 64)``
    image embeddings like every SAM; a ViT encoder's global attention is computed in chunks of heads
    (``backend.models.attention``), which bounds the memory of embedding an image.
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
    chunk_global_attention(sam.image_encoder)
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
