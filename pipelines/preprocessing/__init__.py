"""The preprocessing job: options, listing, decode/dedupe/shard steps, the pipeline, and
writing the output (manifest last)."""
