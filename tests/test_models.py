"""Model factory and checkpoint I/O (backend.models): build, load from every source, save, export."""

import os
import pathlib
import pickle
from collections import OrderedDict

import pooch
import pytest
import requests
import safetensors.torch
import torch
from micro_sam.models.peft_sam import PEFT_Sam
from segment_anything.modeling.image_encoder import Attention

from backend.models import (
    LoadedModel,
    ModelError,
    build_instance_decoder,
    build_sam,
    export_micro_sam_checkpoint,
    load_model,
    merged_state_dict,
    save_model_folder,
    state_fingerprint,
)
from backend.models import attention
from backend.models.attention import HeadChunkedAttention

ZOO_NAME = "vit_t_lm"


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_t_state():
    """State dict of a random vit_t (MobileSAM) model."""
    return build_sam("vit_t", seed=1).state_dict()


@pytest.fixture
def image():
    """A preprocessed SAM input, (1, 3, 1024, 1024) float32."""
    return torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def save_folder(tmp_path):
    """Save a model as a model folder with fixed metadata; returns the folder path."""

    def save(sam, model_type, name="model", mode="full", **meta):
        meta = {"base_model": f"random:{model_type}", "dataset_fingerprint": "d" * 64,
                "metrics": {"val_iou": 0.5}, "config": {"epochs": 1}, **meta}
        return save_model_folder(sam, tmp_path / name, model_type=model_type, mode=mode, **meta)

    return save


@pytest.fixture
def offline_zoo(tmp_path, monkeypatch):
    """An empty micro-sam cache (MICROSAM_CACHEDIR) and no network: every download fails."""
    cache = tmp_path / "microsam-cache"
    monkeypatch.setenv("MICROSAM_CACHEDIR", str(cache))
    downloads = []

    def fetch_offline(self, fname, *args, **kwargs):
        downloads.append(fname)
        raise requests.exceptions.ConnectionError(f"Failed to resolve host for '{fname}'")

    monkeypatch.setattr(pooch.Pooch, "fetch", fetch_offline)
    return cache / "models", downloads


def _encode(sam, image):
    with torch.no_grad():
        return sam.image_encoder(image)


# --- building ----------------------------------------------------------------------------------


def test_tiny_model_produces_sam_shaped_embeddings_quickly(image):
    sam = build_sam("tiny")
    embeddings = _encode(sam, image)
    assert embeddings.shape == (1, 256, 64, 64)
    assert sam.prompt_encoder.get_dense_pe().shape == (1, 256, 64, 64)


def test_global_attention_in_chunks_of_heads_embeds_as_segment_anythings_does(image, monkeypatch):
    """Chunking bounds the memory of embedding an image (vit_b: ~2.4 GB of attention scores at once)
    and must not change the embedding."""
    sam = build_sam("tiny")
    attn = sam.image_encoder.blocks[1].attn  # the tiny encoder's global-attention block
    assert type(attn) is HeadChunkedAttention
    with torch.no_grad():  # relative positions start at zero: make them count
        attn.rel_pos_h.normal_(generator=torch.Generator().manual_seed(1))
        attn.rel_pos_w.normal_(generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(attention, "CHUNK_BYTES", 1)  # one head at a time: two chunks
    chunked = _encode(sam, image)
    attn.__class__ = Attention
    assert torch.allclose(chunked, _encode(sam, image), atol=1e-5)


def test_build_is_deterministic_per_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = state_fingerprint(build_sam("tiny", seed=0).state_dict())
    assert torch.equal(torch.rand(3), expected_draw)
    assert state_fingerprint(build_sam("tiny", seed=0).state_dict()) == first
    assert state_fingerprint(build_sam("tiny", seed=1).state_dict()) != first


@pytest.mark.parametrize("model_type", ["tiny", "vit_t"])
def test_random_source_loads_each_small_type(model_type):
    loaded = load_model(f"random:{model_type}")
    assert isinstance(loaded, LoadedModel)
    assert loaded.model_type == model_type
    assert loaded.source == f"random:{model_type}"
    assert loaded.meta == {}
    assert not loaded.sam.training
    assert loaded.fingerprint == state_fingerprint(build_sam(model_type).state_dict())
    assert loaded.decoder_state is None and build_instance_decoder(loaded) is None


def test_encoder_fingerprint_ignores_decoder_changes():
    sam = build_sam("tiny")
    state = sam.state_dict()
    encoder_only = {key: value for key, value in state.items() if key.startswith("image_encoder.")}
    loaded = load_model("random:tiny")
    assert loaded.encoder_fingerprint == state_fingerprint(encoder_only)
    state["mask_decoder.iou_token.weight"] = state["mask_decoder.iou_token.weight"] + 1
    assert state_fingerprint(state) != loaded.fingerprint


def test_unknown_random_type_is_refused():
    with pytest.raises(ModelError, match="vit_x.*random:vit_t"):
        load_model("random:vit_x")


# --- model folders -----------------------------------------------------------------------------


def test_model_folder_round_trip_keeps_weights_and_meta(save_folder):
    sam = build_sam("tiny", seed=3)
    folder = save_folder(sam, "tiny", mode="decoder")
    assert sorted(path.name for path in folder.iterdir()) == ["meta.json", "model.safetensors"]

    loaded = load_model(folder)
    assert loaded.model_type == "tiny"
    assert loaded.fingerprint == state_fingerprint(sam.state_dict())
    assert loaded.decoder_state is None
    meta = loaded.meta
    assert set(meta) == {"format", "version", "model_type", "base_model", "mode", "dataset_fingerprint",
                         "metrics", "config", "sha256", "created"}
    assert meta["format"] == "napari-raysam/model" and meta["version"] == 1
    assert meta["model_type"] == "tiny" and meta["mode"] == "decoder"
    assert meta["base_model"] == "random:tiny"
    assert meta["dataset_fingerprint"] == "d" * 64
    assert meta["metrics"] == {"val_iou": 0.5} and meta["config"] == {"epochs": 1}
    assert meta["created"].endswith("+00:00")
    assert set(safetensors.torch.load_file(folder / "model.safetensors")) == set(sam.state_dict())


def test_tampered_weights_are_detected(save_folder):
    folder = save_folder(build_sam("tiny"), "tiny")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # flip one byte of the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="corrupt or was modified"):
        load_model(folder)


def test_saving_replaces_an_existing_folder_without_leftovers(save_folder, tmp_path):
    save_folder(build_sam("tiny", seed=0), "tiny")
    newer = build_sam("tiny", seed=1)
    folder = save_folder(newer, "tiny", metrics={"val_iou": 0.9})
    assert load_model(folder).fingerprint == state_fingerprint(newer.state_dict())
    assert load_model(folder).meta["metrics"] == {"val_iou": 0.9}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_failed_save_leaves_the_previous_folder_intact(save_folder, tmp_path):
    previous = build_sam("tiny", seed=0)
    folder = save_folder(previous, "tiny")
    with pytest.raises(TypeError):  # metrics that JSON cannot hold fail after the weights were written
        save_folder(build_sam("tiny", seed=1), "tiny", metrics={"val_iou": object()})
    assert load_model(folder).fingerprint == state_fingerprint(previous.state_dict())
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_save_checks_mode_and_model_type(save_folder):
    with pytest.raises(ValueError, match="decoder, full, lora"):
        save_folder(build_sam("tiny"), "tiny", mode="partial")
    with pytest.raises(ModelError, match="is a tiny model.*vit_b"):
        save_folder(build_sam("tiny"), "vit_b")


def test_folder_without_model_files_is_refused(tmp_path):
    with pytest.raises(ModelError, match="not a model folder"):
        load_model(tmp_path)


# --- LoRA merge --------------------------------------------------------------------------------


@pytest.mark.parametrize("update_matrices", [["q", "v"], ["q", "k", "v", "mlp"]])
def test_lora_is_merged_into_plain_weights_with_equal_outputs(update_matrices, save_folder, image):
    sam = build_sam("tiny")
    base_embeddings = _encode(sam, image)
    PEFT_Sam(sam, rank=2, update_matrices=update_matrices)  # replaces sam's layers in place
    generator = torch.Generator().manual_seed(0)
    for name, parameter in sam.named_parameters():
        if "w_b_linear" in name:  # B starts at zero, which would make LoRA a no-op
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.1
    lora_embeddings = _encode(sam, image)
    assert not torch.allclose(lora_embeddings, base_embeddings, atol=1e-3)
    state_before = state_fingerprint(sam.state_dict())

    folder = save_folder(sam, "tiny", mode="lora")

    assert state_fingerprint(sam.state_dict()) == state_before  # the trained model is untouched
    loaded = load_model(folder)
    assert set(loaded.sam.state_dict()) == set(build_sam("tiny").state_dict())
    torch.testing.assert_close(_encode(loaded.sam, image), lora_embeddings, atol=1e-4, rtol=1e-4)


def test_merged_state_dict_without_lora_is_the_plain_state():
    sam = build_sam("tiny")
    assert state_fingerprint(merged_state_dict(sam)) == state_fingerprint(sam.state_dict())


def test_unmergeable_adapters_are_refused(save_folder):
    from micro_sam.models.peft_sam import FacTSurgery

    sam = build_sam("tiny")
    PEFT_Sam(sam, rank=2, peft_module=FacTSurgery)
    with pytest.raises(ModelError, match="FacTSurgery.*cannot be merged"):
        save_folder(sam, "tiny", mode="lora")


# --- checkpoint files --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "file_name, to_checkpoint",
    [
        ("sam.pth", lambda state: state),
        ("micro_sam.pt", lambda state: {"model_state": state}),
        ("trained.pt", lambda state: {"model_state": {f"sam.{key}": value for key, value in state.items()},
                                      "decoder_state": {"base.weight": torch.zeros(2)}}),
    ],
)
def test_torch_checkpoint_formats_load(file_name, to_checkpoint, vit_t_state, tmp_path):
    path = tmp_path / file_name
    torch.save(to_checkpoint(vit_t_state), path)
    loaded = load_model(str(path))
    assert loaded.model_type == "vit_t"
    assert loaded.fingerprint == state_fingerprint(vit_t_state)


def test_safetensors_file_loads(tmp_path):
    state = build_sam("tiny", seed=5).state_dict()
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(state, path)
    loaded = load_model(path)
    assert loaded.model_type == "tiny"
    assert loaded.fingerprint == state_fingerprint(state)


# --- micro-sam's instance segmentation decoder ---------------------------------------------------


def test_micro_sam_checkpoint_with_decoder_gives_its_decoder(decoder_state, tmp_path):
    sam = build_sam("tiny", seed=4)
    path = tmp_path / "vit_tiny_lm.pt"
    # micro-sam's export_instance_segmentation_model writes exactly this.
    torch.save({"model_state": OrderedDict(sam.state_dict()), "decoder_state": decoder_state}, path)

    loaded = load_model(path)
    assert loaded.fingerprint == state_fingerprint(sam.state_dict())  # the SAM weights alone
    assert loaded.decoder_state.keys() == decoder_state.keys()
    assert all(torch.equal(loaded.decoder_state[key], value) for key, value in decoder_state.items())
    assert "decoder_state" not in repr(loaded)  # megabytes of tensors stay out of logs

    decoder = build_instance_decoder(loaded)
    torch.testing.assert_close(decoder.out_conv.weight, decoder_state["out_conv.weight"])


def test_decoder_that_does_not_fit_is_refused(decoder_state, tmp_path):
    incomplete = {key: value for key, value in decoder_state.items() if key != "out_conv.weight"}
    torch.save({"model_state": build_sam("tiny").state_dict(), "decoder_state": incomplete}, tmp_path / "cut.pt")
    with pytest.raises(ModelError, match="decoder in .*cut.pt does not fit.*out_conv.weight"):
        build_instance_decoder(load_model(tmp_path / "cut.pt"))

    torch.save({"model_state": build_sam("tiny").state_dict(), "decoder_state": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(ModelError, match="'decoder_state' that is not a mapping of names to tensors"):
        load_model(tmp_path / "odd.pt")


class _TouchOnUnpickle:
    """Unpickling this creates ``marker``: stands for a checkpoint carrying arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.mark.parametrize("write", [torch.save, lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=2))])
def test_checkpoint_needing_unpickling_is_refused_without_running_its_code(write, tmp_path):
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_TouchOnUnpickle(control)))
    assert control.exists()  # the payload does run when unpickled

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    write({"model_state": {"w": torch.zeros(1)}, "trap": _TouchOnUnpickle(marker)}, path)
    with pytest.raises(ModelError, match="refusing to unpickle"):
        load_model(path)
    assert not marker.exists()


def test_damaged_file_is_refused(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read .*broken.pth.*damaged"):
        load_model(path)


def test_checkpoint_with_missing_tensors_names_the_architecture(vit_t_state, tmp_path):
    state = {key: value for key, value in vit_t_state.items() if not key.startswith("mask_decoder.")}
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ModelError, match=r"vit_t architecture: \d+ missing tensors"):
        load_model(tmp_path / "partial.pth")


def test_checkpoint_with_other_shapes_names_the_architecture(tmp_path):
    state = build_sam("tiny").state_dict()
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 128)
    safetensors.torch.save_file(state, tmp_path / "reshaped.safetensors")
    with pytest.raises(ModelError, match=r"tiny architecture: 1 tensors of another shape.*\(1, 128\)"):
        load_model(tmp_path / "reshaped.safetensors")


def test_checkpoint_of_unknown_architecture_is_refused(tmp_path):
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(100, 3, 16, 16)}, tmp_path / "wide.pth")
    with pytest.raises(ModelError, match="width 100.*vit_b 768"):
        load_model(tmp_path / "wide.pth")
    torch.save({"backbone.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ModelError, match="not a SAM checkpoint"):
        load_model(tmp_path / "other.pth")


def test_unknown_name_suggests_close_zoo_names(offline_zoo):
    with pytest.raises(ModelError, match="Did you mean 'vit_._lm'") as error:
        load_model("vit_q_lm")
    assert "vit_b_lm" in str(error.value) and "random:<type>" in str(error.value)


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no file or folder at .*missing.pt"):
        load_model(tmp_path / "missing.pt")


# --- micro-sam zoo and export ------------------------------------------------------------------


def test_uncached_zoo_model_offline_names_file_and_folder(offline_zoo):
    models_dir, downloads = offline_zoo
    with pytest.raises(ModelError) as error:
        load_model(ZOO_NAME)
    message = str(error.value)
    assert downloads == [ZOO_NAME]
    assert f"'{ZOO_NAME}'" in message and str(models_dir) in message and "MICROSAM_CACHEDIR" in message


def test_cached_zoo_model_loads_with_its_decoder_without_network(offline_zoo, vit_t_state, decoder_state):
    models_dir, downloads = offline_zoo
    models_dir.mkdir(parents=True)
    torch.save({"model_state": vit_t_state}, models_dir / ZOO_NAME)
    torch.save(decoder_state, models_dir / f"{ZOO_NAME}_decoder")  # micro-sam's zoo keeps it in its own file
    loaded = load_model(ZOO_NAME)
    assert downloads == []
    assert loaded.model_type == "vit_t" and loaded.source == ZOO_NAME
    assert loaded.fingerprint == state_fingerprint(vit_t_state)
    assert loaded.decoder_state.keys() == decoder_state.keys()


def test_uncached_zoo_decoder_offline_is_named_and_the_model_still_loads(offline_zoo, vit_t_state):
    models_dir, downloads = offline_zoo
    models_dir.mkdir(parents=True)
    torch.save({"model_state": vit_t_state}, models_dir / ZOO_NAME)
    with pytest.warns(UserWarning, match=f"decoder of micro-sam model '{ZOO_NAME}'.*the file '{ZOO_NAME}_decoder'"):
        loaded = load_model(ZOO_NAME)
    assert downloads == [f"{ZOO_NAME}_decoder"]
    assert loaded.model_type == "vit_t" and loaded.decoder_state is None


def test_zoo_decoder_needing_unpickling_is_refused_without_running_its_code(offline_zoo, vit_t_state, tmp_path):
    models_dir, _ = offline_zoo
    models_dir.mkdir(parents=True)
    torch.save({"model_state": vit_t_state}, models_dir / ZOO_NAME)
    marker = tmp_path / "marker"
    trapped = {"out_conv.weight": torch.zeros(1), "trap": _TouchOnUnpickle(marker)}
    torch.save(trapped, models_dir / f"{ZOO_NAME}_decoder")
    with pytest.raises(ModelError, match="refusing to unpickle .*_decoder"):
        load_model(ZOO_NAME)
    assert not marker.exists()


def test_export_opens_in_micro_sam(save_folder, tmp_path):
    from micro_sam.util import get_sam_model

    sam = build_sam("vit_t", seed=2)
    folder = save_folder(sam, "vit_t")
    output = export_micro_sam_checkpoint(folder, tmp_path / "export" / "vit_t_hpa.pt")
    assert sorted(os.listdir(output.parent)) == ["vit_t_hpa.pt"]

    _, micro_sam_model = get_sam_model(model_type="vit_t", checkpoint_path=output, device="cpu", return_sam=True)
    assert state_fingerprint(micro_sam_model.state_dict()) == state_fingerprint(sam.state_dict())


def test_export_of_tiny_model_is_refused(save_folder, tmp_path):
    folder = save_folder(build_sam("tiny"), "tiny")
    with pytest.raises(ModelError, match="micro-sam cannot build"):
        export_micro_sam_checkpoint(folder, tmp_path / "tiny.pt")
    assert not (tmp_path / "tiny.pt").exists()

