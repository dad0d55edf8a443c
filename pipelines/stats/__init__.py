"""Statistics of a preprocess output: the TFDV-format proto, tf.Transform analyzers,
drift against a baseline, the HTML report, and the phase that wires them into the job."""
