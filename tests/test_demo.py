"""The README's first command: the demo's whole loop on the real HeLa frames, on this session's Ray."""

from __future__ import annotations

import json

from napari_raysam.demo import run_demo


def test_the_demo_fine_tunes_on_the_cluster_scores_both_models_and_says_the_cluster_keeps_running(ray_cluster, tmp_path):
    lines: list[str] = []
    summary = run_demo(tmp_path / "out", cluster=ray_cluster, model="random:tiny", minutes=0.1, log=lines.append)

    assert summary["before"]["n_objects"] == summary["after"]["n_objects"] == 80  # 40 per held-out frame
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    assert (tmp_path / "out" / "demo.png").stat().st_size > 10_000
    assert any(line.startswith("  epoch 1: val IoU") for line in lines)  # it says how training goes as it goes
    assert ray_cluster.dashboard_url in lines[-1] and "napari-raysam cluster stop" in lines[-1]
