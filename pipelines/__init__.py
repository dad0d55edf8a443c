"""imagebeam: raw images to training-ready TFRecord shards, statistics and a model.

Entry points (each `python -m`): `preprocess`, `run` (preprocess + train), `retrain`.
Subpackages, lowest layer first: `contract` (what an output is: records, manifest,
decode/resize and its TensorFlow twin, output ownership; imports nothing else of ours),
`local` (runner-side helpers), `preprocessing` (the Beam job), `stats` (statistics,
tf.Transform, drift, report), `cloud` (Dataflow, Flex, Vertex AI, packaging),
`retraining` (the scheduled tick and its gate).
"""
