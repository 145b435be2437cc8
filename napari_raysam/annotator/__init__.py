"""The annotator's core, without Qt: image channels, the SAM session, autosaved commits, model
sources and the export of annotated images. ``widgets/annotator.py`` is a thin face over it."""
