"""Google Cloud: submitting to Dataflow, the Flex Template launcher, Vertex AI training
jobs, and the wheel and pinned lock the workers install."""
