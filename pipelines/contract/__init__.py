"""The data contract every other part reads: record keys and encoding, the manifest,
decode/resize (Pillow) and its TensorFlow twin for serving, and which folders are ours.
Imports nothing of ours outside this package."""
