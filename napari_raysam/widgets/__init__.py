"""napari dock widgets (Qt). Thin: every decision they show is made in the Qt-free core."""
