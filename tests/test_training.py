"""The plain-PyTorch training engine (no Ray): modes, embeddings once, resume, export."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from backend.config import ConfigError, TrainConfig
from backend.dataset import DatasetError, open_dataset, write_embedding, write_samples
from backend.models import load_model
from backend.training import SamFineTuner, train
from synthetic import cell_samples

SMALL = {"n_objects_per_batch": 3, "n_sub_iteration": 2, "patch_shape": (96, 96)}


def config(data, tmp_path, **overrides) -> TrainConfig:
    values = {"data": str(data), "storage": str(tmp_path / "runs"), "model": "random:tiny", "epochs": 1, **SMALL}
    return TrainConfig(**{**values, **overrides})


@pytest.mark.parametrize("mode", ["decoder", "full", "lora"])
def test_each_mode_writes_the_run_directory_and_a_loadable_model(mode, cell_dataset, tmp_path):
    cfg = config(cell_dataset, tmp_path, mode=mode)
    before = load_model("random:tiny").sam.state_dict()
    model_folder = train(cfg)

    assert model_folder == cfg.run_dir / "model"
    assert json.loads((cfg.run_dir / "config.json").read_text())["mode"] == mode
    (line,) = [json.loads(s) for s in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert set(line) == {"epoch", "train_loss", "val_loss", "val_iou", "lr", "samples_per_s", "elapsed_s"}
    assert line["samples_per_s"] > 0 and 0 <= line["val_iou"] <= 1
    loaded = load_model(model_folder)
    assert loaded.meta["mode"] == mode and loaded.meta["base_model"] == "random:tiny"
    after = loaded.sam.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    # decoder mode leaves the image encoder untouched; full and LoRA (merged) change it
    assert "mask_decoder" in changed
    assert ("image_encoder" in changed) == (mode != "decoder")


def test_decoder_mode_computes_each_embedding_once(cell_dataset, tmp_path, monkeypatch):
    cfg = config(cell_dataset, tmp_path, mode="decoder", epochs=3)
    tuner = SamFineTuner(cfg)
    calls = []
    encoder = tuner.sam.image_encoder
    monkeypatch.setattr(encoder, "forward", lambda *a, **k: calls.append(1))
    for epoch in range(cfg.epochs):
        tuner.run_epoch(epoch)
    assert calls == []  # 4 images were embedded in the constructor; training never runs the encoder
    assert len(tuner._embeddings) == 4


def test_training_computes_with_denormal_floats_flushed_to_zero(cell_dataset, tmp_path):
    # training a decoder that has learned makes many; on a CPU each costs many times a normal float, and
    # a run slowed to less than half its speed as it learned (docs/BENCHMARKS.md)
    def tiny_product() -> float:  # 1e-40: below float32's smallest normal number, ~1.2e-38
        return float(torch.tensor([1e-20]) * torch.tensor([1e-20]))

    torch.set_flush_denormal(False)
    assert tiny_product() > 0
    SamFineTuner(config(cell_dataset, tmp_path, mode="decoder"))
    in_a_thread_started_after = []
    thread = threading.Thread(target=lambda: in_a_thread_started_after.append(tiny_product()))
    thread.start()
    thread.join()
    assert tiny_product() == 0 and in_a_thread_started_after == [0]


def test_decoder_mode_uses_embeddings_stored_in_the_dataset(tmp_path, monkeypatch):
    data = tmp_path / "embedded.zarr"
    write_samples(data, cell_samples(1, "train", shape=(96, 96)) + cell_samples(1, "val", seed=4, shape=(96, 96)))
    model = load_model("random:tiny")
    dataset = open_dataset(data)
    for sample_id in dataset.sample_ids():
        stored = torch.full((256, 64, 64), 0.5).numpy().astype("float16")
        write_embedding(data, sample_id, stored, model_fingerprint=model.encoder_fingerprint,
                        input_size=(1024, 1024), original_size=(96, 96))
    calls = []
    monkeypatch.setattr(type(model.sam.image_encoder), "forward", lambda *a, **k: calls.append(1))
    tuner = SamFineTuner(config(data, tmp_path, mode="decoder"))
    assert calls == []
    assert all(torch.all(emb == 0.5) for emb, _ in tuner._embeddings.values())


def test_training_reduces_the_loss_on_data_it_sees(tmp_path):
    data = tmp_path / "one.zarr"
    samples = cell_samples(1, "train", seed=5, shape=(128, 128), n_cells=5)
    write_samples(data, samples + [type(samples[0])(samples[0].image, samples[0].labels, split="val")])
    cfg = config(data, tmp_path, mode="decoder", epochs=12, lr=3e-4, lr_schedule="constant", mask_prob=0.0)
    tuner = SamFineTuner(cfg)
    records = [tuner.run_epoch(epoch) for epoch in range(cfg.epochs)]
    first, last = records[0].val_loss, min(r.val_loss for r in records[-3:])
    assert last < first - 0.02, [round(r.val_loss, 4) for r in records]


def test_resume_continues_after_the_last_finished_epoch(cell_dataset, tmp_path):
    cfg = config(cell_dataset, tmp_path, epochs=2, run_name="resumed")
    tuner = SamFineTuner(cfg)
    tuner.run_epoch(0)
    state = tuner.state(0)
    fresh = SamFineTuner(cfg)
    assert fresh.load_state(state) == 1
    assert fresh.iteration == tuner.iteration
    for name, value in state["trainable"].items():
        assert torch.equal(dict(fresh.sam.named_parameters())[name].detach().cpu(), value)


def test_train_resumes_a_crashed_run_from_its_state_file(cell_dataset, tmp_path, monkeypatch):
    cfg = config(cell_dataset, tmp_path, epochs=2, run_name="crashy")
    calls = []
    original = SamFineTuner.run_epoch

    def crash_in_second_epoch(self, epoch):
        calls.append(epoch)
        if len(calls) == 2:
            raise RuntimeError("worker died")
        return original(self, epoch)

    monkeypatch.setattr(SamFineTuner, "run_epoch", crash_in_second_epoch)
    with pytest.raises(RuntimeError, match="worker died"):
        train(cfg)
    monkeypatch.setattr(SamFineTuner, "run_epoch", original)
    train(cfg)
    epochs = [json.loads(s)["epoch"] for s in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert calls == [0, 1] and epochs == [0, 1]


def test_unwritable_storage_is_reported_before_training(cell_dataset, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(PermissionError, match="Pick a --storage folder"):
        train(config(cell_dataset, tmp_path, storage=str(blocked)))


def test_a_split_without_objects_is_refused(tmp_path):
    data = tmp_path / "noval.zarr"
    write_samples(data, cell_samples(2, "train", shape=(96, 96)))
    with pytest.raises(DatasetError, match="val"):
        SamFineTuner(config(data, tmp_path))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mode": "half"}, "mode must be one of"),
        ({"epochs": 0}, "epochs must be a whole number"),
        ({"lr": 2.0}, "lr must be between"),
        ({"patch_shape": (32, 32)}, "patch_shape"),
        ({"mode": "lora", "model": "random:vit_t"}, "LoRA needs a ViT"),
        ({"run_name": "a/b"}, "run_name"),
        ({"launcher": "driver", "workers": 2}, "use --launcher ray-train"),
        ({"launcher": "slurm"}, "launcher must be one of"),
    ],
)
def test_config_errors_say_what_to_fix(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(data="d.zarr", storage=str(tmp_path), **overrides)


def test_config_round_trips_through_json(tmp_path):
    cfg = TrainConfig(data="d.zarr", storage=str(tmp_path), patch_shape=(256, 128), extra={"who": "widget"})
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ConfigError, match="unknown training settings: colour"):
        TrainConfig.from_dict({**cfg.to_dict(), "colour": "red"})


def test_progress_reaches_the_last_step_when_batches_do_not_divide_the_images(cell_dataset, tmp_path):
    cfg = config(cell_dataset, tmp_path, mode="decoder", batch_size=2, samples_per_epoch=3)  # 3 image steps -> 2 steps
    reports = []
    tuner = SamFineTuner(cfg, progress=lambda epoch, step, total: reports.append((epoch, step, total)))
    tuner.run_epoch(0)
    assert reports == [(0, 1, 2), (0, 2, 2)]
