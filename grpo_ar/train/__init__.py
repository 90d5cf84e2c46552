"""Training: the loop (`trainer`), one step's pieces (`step`), batching and dynamic sampling,
evaluation, reference policies and the run state saved in checkpoints. Nothing here is
modality-specific."""
