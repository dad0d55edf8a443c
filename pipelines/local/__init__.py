"""Helpers of local runs: the second process that runs tf.Transform, and progress."""
