"""Tiny random-init instances of the real model classes, and locally built tokenizers: one place
for what tests, benchmarks and examples would otherwise each re-type.

Everything heavy (transformers, tokenizers, diffusers) is imported inside the functions, so
importing this module costs no more than importing torch. Builders that take a `seed` call
`torch.manual_seed(seed)` first: the same arguments give the same weights.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

CHARS = list("0123456789+-*=?: abcdefghijklmnopqrstuvwxyz<>/.,ABCDEFGHIJKLMNOPQRSTUVWXYZ")
SPECIALS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2 in every tokenizer built here
VQ_CODES = 16  # codebook size of tiny_vqmodel / tiny_janus_vq / tiny_emu3_vq


# ----------------------------------------------------------------------------------- tokenizers
def word_level_tokenizer(words: list[str] | tuple[str, ...], chars: bool = False) -> Any:
    """PreTrainedTokenizerFast over `words` (SPECIALS first unless already there) with
    <pad>=0, <bos>=1, <eos>=2, a <bos> prefix and left padding. `chars=True` splits text into
    single characters (and fuses them back on decode); else it splits on whitespace."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    if chars:
        tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
        tk.decoder = decoders.Fuse()
    else:
        tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        padding_side="left",
    )


def char_tokenizer() -> Any:
    """A local char-level PreTrainedTokenizerFast over CHARS with <pad>=0, <bos>=1, <eos>=2."""
    return word_level_tokenizer(CHARS, chars=True)


# ---------------------------------------------------------------------------------- causal LMs
def lm_config(vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 4,
              kv_heads: int = 2, mlp: int | None = None, max_positions: int = 256,
              arch: str = "llama", **extra: Any) -> Any:  # fmt: skip
    """LlamaConfig (arch="llama") or Qwen2Config ("qwen2"); MLP width `mlp` (default 2·hidden),
    special ids pad 0, bos 1, eos 2 unless `extra` says otherwise (extra: any config field)."""
    from transformers import LlamaConfig, Qwen2Config

    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config}
    if arch not in configs:
        raise ValueError(f"arch={arch!r} is not one of {sorted(configs)}")
    fields = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **extra}
    return configs[arch](
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=mlp or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        **fields,
    )


def causal_lm(config: Any) -> Any:
    """LlamaForCausalLM / Qwen2ForCausalLM of `config`, in train mode, from the current RNG."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    return {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}[config.model_type](config)


def tiny_llama(vocab_size: int = 80, seed: int = 0, hidden: int = 32, layers: int = 2,
               logit_scale: float = 8.0, **config: Any) -> Any:  # fmt: skip
    """Random-init LlamaForCausalLM in eval mode (`config`: more `lm_config` arguments). The
    head is scaled by `logit_scale`: peaked, non-uniform distributions, so filters matter."""
    torch.manual_seed(seed)
    model = causal_lm(lm_config(vocab_size, hidden, layers, **config)).eval()
    if logit_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(logit_scale)
    return model


def save_char_llama(path: Path, seed: int = 0) -> Any:
    """`tiny_llama` and its `char_tokenizer` saved together at `path`, the folder a CLI run's
    `model.path` names; returns the tokenizer."""
    tok = char_tokenizer()
    tiny_llama(vocab_size=len(tok), seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return tok


def tiny_qwen2(vocab_size: int = 80, seed: int = 0, hidden: int = 32) -> Any:
    """Random-init Qwen2ForCausalLM in eval mode, the shape of `tiny_llama`'s (unscaled head)."""
    torch.manual_seed(seed)
    return causal_lm(lm_config(vocab_size, hidden, arch="qwen2")).eval()


# ------------------------------------------------------------------------------- VQ tokenizers
def vq_model(codebook: int, channels: list[int] | tuple[int, ...], size: int,
             mid_attention: bool = False, **extra: Any) -> Any:  # fmt: skip
    """diffusers VQModel (train mode, current RNG): spatial factor 2^(len(channels) - 1), codes
    of dim 4, one layer per block; `extra`: more VQModel arguments (lookup_from_codebook, ...)."""
    from diffusers import VQModel

    return VQModel(
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=tuple(channels),
        layers_per_block=1,
        latent_channels=4,
        num_vq_embeddings=codebook,
        vq_embed_dim=4,
        norm_num_groups=8,
        sample_size=size,
        mid_block_add_attention=mid_attention,
        **extra,
    )


def structured_images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(b, 3, h, w) in [-1, 1] with spatial structure (gradients + noise), not symmetric in h/w."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(-1, 1, h)[:, None].expand(h, w)
    xs = torch.linspace(-1, 1, w)[None, :].expand(h, w)
    base = torch.stack([ys, xs, ys * xs])
    return (base + 0.5 * torch.randn(b, 3, h, w, generator=g)).clamp(-1, 1)


def tiny_vqmodel(lookup_from_codebook: bool = False, seed: int = 0, norm_type: str = "group"):
    """diffusers VQModel, spatial factor 2, VQ_CODES codes of dim 4 (~0.2M params), eval mode.
    `norm_type="spatial"` (MoVQ) modulates the decoder's norms by the codes, so codes differ in
    brightness."""
    torch.manual_seed(seed)
    vq = vq_model(VQ_CODES, (32, 32), 8, mid_attention=True, norm_type=norm_type,
                  lookup_from_codebook=lookup_from_codebook).eval()  # fmt: skip
    # codebook rows drawn from the encoder's latents (as a k-means init would): the default
    # uniform(±1/K) rows are so small that one code wins almost everywhere
    with torch.no_grad():
        lat = vq.encode(structured_images(2, 8, 12, seed=seed + 1)).latents
        rows = lat.permute(0, 2, 3, 1).reshape(-1, 4)
        vq.quantize.embedding.weight.copy_(rows[torch.randperm(len(rows))[:VQ_CODES]])
    return vq


def tiny_janus_vq(seed: int = 0, side: int = 4):
    """transformers JanusVQVAE, spatial factor 2, a side×side grid; its codebook rows are
    L2-normalised as in LlamaGen's VQ, so nearest-code search and decode lookup agree."""
    from transformers import JanusVQVAE, JanusVQVAEConfig

    torch.manual_seed(seed)
    cfg = JanusVQVAEConfig(
        embed_dim=4,
        num_embeddings=VQ_CODES,
        latent_channels=32,
        base_channels=32,
        channel_multiplier=[1, 1],
        num_res_blocks=1,
        num_patches=side,
        projection_dim=8,
        image_token_embed_dim=8,
    )
    vq = JanusVQVAE(cfg).eval()
    with torch.no_grad():
        w = vq.quantize.embedding.weight
        w.copy_(torch.nn.functional.normalize(w, dim=-1))
    return vq


def tiny_emu3_vq(seed: int = 0):
    """transformers Emu3VQVAE (embed_dim == latent_channels), spatial 2, temporal 4."""
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    torch.manual_seed(seed)
    cfg = Emu3VQVAEConfig(
        codebook_size=VQ_CODES,
        embed_dim=4,
        latent_channels=4,
        base_channels=32,
        channel_multiplier=[1, 1],
        num_res_blocks=1,
        attn_resolutions=[],
        hidden_size=32,
        num_attention_heads=1,
        temporal_downsample_factor=4,
    )
    return Emu3VQVAE(cfg).eval()


# ---------------------------------------------------------------------------------- tiny runs
def tiny_vq_run(root: Path, modality: str, grid: tuple[int, ...], rows: list[dict[str, Any]],
                code_offset: int = 8, bos: int = 1) -> list[str]:  # fmt: skip
    """Saves a tiny_llama over `code_offset` + VQ_CODES ids (root/lm), a tiny_vqmodel (root/vq)
    and `rows` (root/train.jsonl); -> the `key=value` overrides of a one-step `modality`
    ("image" or "video") run of them: 4 classes from id 2, CFG 2, written to root/run."""
    import json

    lm_dir, vq_dir, data = root / "lm", root / "vq", root / "train.jsonl"
    tiny_llama(vocab_size=code_offset + VQ_CODES).save_pretrained(lm_dir)
    tiny_vqmodel().save_pretrained(vq_dir)
    data.write_text("\n".join(json.dumps(r) for r in rows))
    m = modality
    return [
        f"model.path={lm_dir}",
        f"model.adapter={m}",
        f"{m}.decoder_path={vq_dir}",
        f"{m}.grid={list(grid)}",
        f"{m}.code_offset={code_offset}",
        f"{m}.class_offset=2",
        f"{m}.num_classes=4",
        f"{m}.bos_token_id={bos}",
        f"sampling.max_new_tokens={math.prod(grid)}",
        "sampling.cfg_scale=2.0",
        f"data.train={data}",
        "algorithm.group_size=2",
        "trainer.batch_size=2",
        "trainer.steps=1",
        "trainer.lr=1e-3",
        f"log.run_dir={root / 'run'}",
        "log.progress=false",
    ]


def run_records(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(metrics.jsonl rows, samples.jsonl rows) of a finished run."""
    import json

    metrics, samples = (
        [json.loads(x) for x in (run_dir / name).read_text().splitlines()]
        for name in ("metrics.jsonl", "samples.jsonl")
    )
    return metrics, samples


def cli_train(root: Path, adapter: str, overrides: list[str]) -> tuple[list, list]:
    """`grpo-ar train` of a config file naming only the adapter, `overrides` given as --set
    (a tiny_vq_run's); -> run_records of root/run. Raises when the command fails."""
    from grpo_ar.cli import main

    cfg = root / f"{adapter}.toml"
    cfg.write_text(f'[model]\nadapter = "{adapter}"\n')
    code = main(["train", str(cfg), *(x for kv in overrides for x in ("--set", kv))])
    if code != 0:
        raise RuntimeError(f"grpo-ar train {cfg} exited with {code}")
    return run_records(root / "run")
