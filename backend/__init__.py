"""Cluster side of napari-raysam: dataset reading, model factory, training, evaluation.

Runs inside Ray jobs and on plain machines alike; never imports napari, Qt or
``napari_raysam`` (the client package depends on this one, not the reverse).
"""
