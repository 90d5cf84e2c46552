"""Modality adapters (installed as `grpo_ar.adapters`): tokenizer, sampler and decoder per modality."""
