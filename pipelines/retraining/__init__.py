"""Scheduled retraining: one tick (incremental preprocess, candidate, gate, promotion) and
the gate that compares candidate and current model."""
