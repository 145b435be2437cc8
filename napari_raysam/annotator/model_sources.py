"""What the annotator offers as models, and how a chosen path becomes a model source.

A model source is anything :func:`backend.models.load_model` accepts. On top of that, the
annotator accepts a fine-tuning run directory (contract 2) and uses its ``model/`` folder.
"""

from __future__ import annotations

from pathlib import Path

from backend.models import META_FILE, RANDOM_PREFIX, zoo_model_names

PREFERRED_MODELS = ("vit_b_lm", "vit_t_lm", "vit_l_lm", "vit_b", "vit_t")
"""Offered first, in this order: micro-sam's light-microscopy generalists, then original SAM."""
RANDOM_MODELS = (f"{RANDOM_PREFIX}vit_t", f"{RANDOM_PREFIX}vit_b")


def model_choices() -> list[str]:
    """Model names for the model chooser: cached micro-sam models first (they load offline)."""
    names = zoo_model_names()
    cached = set(zoo_model_names(cached_only=True))
    ordered = [name for name in PREFERRED_MODELS if name in names] + sorted(
        name for name in names if name not in PREFERRED_MODELS
    )
    return (
        [name for name in ordered if name in cached]
        + [name for name in ordered if name not in cached]
        + list(RANDOM_MODELS)
    )


def resolve_model_source(text: str) -> str:
    """The model source for what the user typed or picked: a run directory gives its ``model/`` folder."""
    source = text.strip()
    run_model = Path(source).expanduser() / "model"
    if (run_model / META_FILE).is_file():
        return str(run_model)
    return source
