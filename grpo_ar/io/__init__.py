"""What a run reads and writes: data loading (`data`), atomic safetensors checkpoints
(`checkpoint`) and the run directory's JSONL files (`run_files`)."""
