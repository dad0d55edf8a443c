"""Batch prediction: raw image files through a SavedModel's `serving_default` on Beam."""
