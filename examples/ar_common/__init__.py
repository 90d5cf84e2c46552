"""Code the AR image and video examples share: the VQ tokenizer and prior pre-training with its
per-stage cache (pretraining.py), and the run scripts' common command-line plumbing (runs.py).
Imported as `ar_common.*` with examples/ on sys.path, like the examples' own modules."""
