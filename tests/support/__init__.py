"""Test and demo tooling: the GCS emulator, its bridge for TensorFlow's gs:// client, demo
images and `make demo`. Not part of the installed package."""
