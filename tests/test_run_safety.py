"""Hostile but realistic input to `grpo-ar`: each case is one change from a good tiny run and
must get one `grpo-ar: error:` line (exit 2 for bad input, 1 for a fault at run time) before
the first step, with no traceback and no run data changed. Run in-process through `main` (the
same code path as the console script); test_cli_subprocess_* run the real process."""

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo_ar.cli import main
from grpo_ar.errors import explain
from tiny import char_tokenizer, save_char_llama, tiny_llama

PROBLEMS = [(1, 2), (3, 4), (2, 2), (5, 1), (0, 7), (6, 3)]
PY = sys.executable


def write_rows(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def good_rows() -> list[dict]:
    return [
        {"prompt": f"{a}+{b}=", "rewards": {"numeric_answer": {"answer": a + b}}}
        for a, b in PROBLEMS
    ]


def config_text(root: Path, run_dir: Path, model: str = "model", train: str = "train.jsonl") -> str:
    return f"""
[model]
path = "{root / model}"
device = "cpu"

[sampling]
max_new_tokens = 3

[algorithm]
group_size = 2
beta = 0.0

[trainer]
steps = 2
batch_size = 2
lr = 1e-2
seed = 1
threads = 1

[data]
train = "{root / train}"

[log]
run_dir = "{run_dir}"
progress = false
samples_per_step = 2
"""


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny saved model + tokenizer, good data, a good config and one finished good run."""
    root = tmp_path_factory.mktemp("safety")
    save_char_llama(root / "model")
    write_rows(root / "train.jsonl", good_rows())
    (root / "run.toml").write_text(config_text(root, root / "done"), encoding="utf-8")
    rc, _, err = cli("train", str(root / "run.toml"))
    assert rc == 0, err
    return root


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> content hash of every file under `folder`."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def refused(rc: int, err: str, fragment: str, code: int = 2) -> None:
    assert rc == code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("grpo-ar: error:")]
    assert len(lines) == 1, err
    assert fragment in lines[0], lines[0]


def new_config(ws: Path, tmp_path: Path, text: str | None = None) -> Path:
    cfg = tmp_path / "run.toml"
    cfg.write_text(text or config_text(ws, tmp_path / "run"), encoding="utf-8")
    return cfg


# -- config files and --set ----------------------------------------------------------------
def test_malformed_toml_names_file_and_line(ws, tmp_path):
    cfg = new_config(ws, tmp_path)
    cfg.write_text(cfg.read_text() + "\n[trainer\nsteps = 3\n")
    rc, _, err = cli("train", str(cfg))
    refused(rc, err, f"{cfg}:")
    assert "not valid TOML" in err
    assert not (tmp_path / "run").exists()


def test_malformed_yaml_names_file_and_line(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("trainer:\n  steps: 2\n  lr: [1e-3\n")
    rc, _, err = cli("train", str(cfg))
    refused(rc, err, f"{cfg}:")
    assert "not valid YAML" in err


def test_set_value_that_is_not_yaml(ws):
    rc, _, err = cli("train", str(ws / "run.toml"), "--set", "sampling.allowed_ranges=[[1, 2]")
    refused(rc, err, "--set 'sampling.allowed_ranges=[[1, 2]': the value is not valid YAML")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("trainer.weight_decay=-0.1", "trainer.weight_decay=-0.1: need a finite >= 0"),
        ("trainer.threads=-2", "trainer.threads=-2: need >= 0"),
        ("trainer.save_every=-1", "trainer.save_every=-1: need >= 0"),
        ("trainer.lr=.inf", "trainer.lr=inf: need > 0 and finite"),
        ("trainer.dist_timeout_s=0", "trainer.dist_timeout_s must be > 0"),
        ("data.reward_max_failed_frac=2", "data.reward_max_failed_frac=2.0: need a fraction"),
        ("model.max_prompt_tokens=0", "model.max_prompt_tokens=0: need >= 1"),
        ("algorithm.loss_args={eps_low: '0.2'}", "algorithm.loss_args.eps_low='0.2'"),
        ("sampling.allowed_ranges=[[3, 5, 9]]", "allowed_ranges holds [lo, hi) pairs"),
        ("trainer.batch_size=8", "trainer.batch_size=8 exceeds the 6 entries"),
        ("trainer.optimizer=collections.OrderedDict", "is not a torch.optim.Optimizer class"),
        ("sampling.allowed_ranges=[[3, 500]]", "reach past the model's vocabulary of 77"),
        ("sampling.eos_token_ids=[2, 90]", "sampling.eos_token_ids [90] outside"),
        ("model.max_prompt_tokens=4", "data.train row 1:"),  # 5 tokens with BOS; no step ran
    ],
)
def test_bad_value_is_refused_before_the_first_step(ws, tmp_path, override, fragment):
    rc, _, err = cli("train", str(new_config(ws, tmp_path)), "--set", override)
    refused(rc, err, fragment)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_eval_checks_prompts_before_scoring(ws):
    rc, out, err = cli("eval", str(ws / "run.toml"), "--set", "model.max_prompt_tokens=4")
    refused(rc, err, "data.train row 1: prompt(s) [0] exceed max_prompt_tokens=4")
    assert out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the case is a machine without a GPU")
def test_cuda_device_without_a_gpu(ws, tmp_path):
    rc, _, err = cli("train", str(new_config(ws, tmp_path)), "--set", "model.device=cuda")
    refused(rc, err, "model.device=cuda but no CUDA GPU is visible")


# -- data ----------------------------------------------------------------------------------
def test_non_utf8_data_names_the_line(ws, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes((ws / "train.jsonl").read_bytes() + b'{"prompt": "caf\xe9"}\n')
    cfg = new_config(ws, tmp_path, config_text(ws, tmp_path / "run", train=str(data)))
    rc, _, err = cli("train", str(cfg))
    refused(rc, err, f"{data}:7: not UTF-8")


def test_null_prompt(ws, tmp_path):
    data = tmp_path / "train.jsonl"
    write_rows(data, good_rows() + [{"prompt": None, "rewards": "numeric_answer"}])
    rc, _, err = cli("train", str(new_config(ws, tmp_path)), "--set", f"data.train={data}")
    refused(rc, err, f"{data}:7: field 'prompt' (the prompt) is null")


def test_prompt_of_the_wrong_type(ws, tmp_path):
    data = tmp_path / "train.jsonl"
    rows = good_rows()
    rows[3]["prompt"] = {"text": "1+1="}
    write_rows(data, rows)
    rc, _, err = cli("train", str(new_config(ws, tmp_path)), "--set", f"data.train={data}")
    refused(rc, err, "data.train row 4: the prompt is dict")


def test_hf_dataset_that_is_not_available(ws, tmp_path):
    rc, _, err = cli(
        "train", str(new_config(ws, tmp_path)), "--set", f"data.train=hf:{tmp_path}/nothing"
    )
    refused(rc, err, f"hf:{tmp_path}/nothing:train: cannot load the dataset")


# -- the model -----------------------------------------------------------------------------
def test_missing_model_folder(ws, tmp_path):
    rc, _, err = cli("train", str(new_config(ws, tmp_path)), "--set", f"model.path={tmp_path}/no")
    refused(rc, err, f"cannot load the model of model.path='{tmp_path}/no'")


def test_corrupt_model_folder(ws, tmp_path):
    shutil.copytree(ws / "model", tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 64)
    rc, _, err = cli("train", str(new_config(ws, tmp_path)), "--set", f"model.path={tmp_path}/m")
    refused(rc, err, "cannot load the model of model.path=")


def test_model_without_tokenizer(ws, tmp_path):
    (tmp_path / "m").mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (ws / "model" / name).exists():
            shutil.copy(ws / "model" / name, tmp_path / "m" / name)
    rc, _, err = cli("train", str(new_config(ws, tmp_path)), "--set", f"model.path={tmp_path}/m")
    refused(rc, err, "cannot load the model of model.path=")


def test_model_vocabulary_smaller_than_the_tokenizer(ws, tmp_path):
    tok = char_tokenizer()
    tiny_llama(vocab_size=40, seed=0).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    rc, _, err = cli("train", str(new_config(ws, tmp_path)), "--set", f"model.path={tmp_path}/m")
    refused(rc, err, f"the tokenizer has {len(tok)} tokens but the model's output layer only 40")


def test_prompt_ids_outside_the_vocabulary_name_the_row():
    from grpo_ar.adapters.text import TextAdapter
    from grpo_ar.errors import DataError
    from grpo_ar.generation.params import SamplingParams
    from grpo_ar.train.preflight import check_prompts
    from grpo_ar.types import Entry

    adapter = TextAdapter(char_tokenizer(), SamplingParams())
    entries = [Entry("12", ()), Entry("1z", ())]  # "z" is id 45 of the char tokenizer
    check_prompts(adapter, entries, "data.train", vocab=46)
    with pytest.raises(DataError, match="data.train row 2: its prompt encodes to token id 45"):
        check_prompts(adapter, entries, "data.train", vocab=45)


# -- run directories -----------------------------------------------------------------------
def test_run_directory_that_is_a_file(ws, tmp_path):
    (tmp_path / "run").write_text("notes")
    rc, _, err = cli("train", str(new_config(ws, tmp_path)))
    refused(rc, err, f"log.run_dir={tmp_path / 'run'} is a file")
    assert (tmp_path / "run").read_text() == "notes"


def test_train_into_a_finished_run_is_refused(ws):
    before = snapshot(ws / "done")
    rc, _, err = cli("train", str(ws / "run.toml"))
    refused(rc, err, f"log.run_dir={ws / 'done'} holds a run")
    assert "--resume" in err and "--overwrite" in err
    assert snapshot(ws / "done") == before


def api_trainer(config: Path, run: Path, *overrides: str):
    from grpo_ar.cli import load_data, load_model
    from grpo_ar.config import load_config
    from grpo_ar.train.trainer import Trainer

    cfg = load_config(config, [f"log.run_dir={run}", *overrides])
    train, evals = load_data(cfg)
    model, adapter = load_model(cfg)
    return Trainer(cfg, model, adapter, train, evals)


def test_trainer_api_into_a_held_run_is_refused_and_resume_continues(ws, tmp_path):
    """Trainer.train() (no CLI) into a folder holding a run raises before writing anything;
    after Trainer.resume() it continues that run, each step's row written once."""
    from grpo_ar.errors import ConfigError

    run = copy_run(ws / "done", tmp_path / "run")
    before = snapshot(run)
    with pytest.raises(ConfigError, match=f"log.run_dir={run} holds a run"):
        api_trainer(ws / "run.toml", run).train()
    assert snapshot(run) == before
    tr = api_trainer(ws / "run.toml", run, "trainer.steps=3")
    tr.resume()
    tr.train()
    assert steps_of(run / "metrics.jsonl") == [1, 2, 3]


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def steps_of(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_overwrite_starts_over(ws, tmp_path):
    run = copy_run(ws / "done", tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    rc, _, err = cli("train", str(new_config(ws, tmp_path)), "--overwrite")
    assert rc == 0, err
    assert steps_of(run / "metrics.jsonl") == [1, 2]
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files are deleted
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000002"]


def test_resume_of_a_copy_trains_in_the_copy(ws, tmp_path):
    """Copy a run at its step-1 checkpoint, resume the copy: the copy finishes, the original is
    untouched, and the copy's config.yaml records the copy."""
    a = tmp_path / "a"
    cfg = new_config(ws, tmp_path, config_text(ws, a))
    assert (
        cli("train", str(cfg), "--set", "trainer.save_every=1", "--set", "trainer.steps=1")[0] == 0
    )
    b = copy_run(a, tmp_path / "b")
    before = snapshot(a)
    rc, _, err = cli("train", "--resume", str(b), "--set", "trainer.steps=2")
    assert rc == 0, err
    assert snapshot(a) == before
    assert steps_of(b / "metrics.jsonl") == [1, 2]
    assert (b / "checkpoints" / "latest").read_text() == "step_000002"
    assert f"run_dir: {b}" in (b / "config.yaml").read_text()


def test_resume_with_a_bad_override_writes_nothing(ws, tmp_path):
    run = copy_run(ws / "done", tmp_path / "run")
    before = snapshot(run)
    for bad in ("trainer.lr=.nan", "trainer.optimizer=os.path", "model.path=/nonexistent"):
        rc, _, err = cli("train", "--resume", str(run), "--set", bad)
        assert rc == 2 and "Traceback" not in err, err
        assert snapshot(run) == before, bad
    rc, _, err = cli("train", "--resume", str(run))  # the plain resume still works
    assert rc == 0, err
    assert snapshot(run) == before  # a finished run: nothing to do, nothing rewritten


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    rc, _, err = cli("train", "--resume", str(tmp_path))
    refused(rc, err, "not a run directory (no config.yaml)")


@pytest.mark.parametrize("pointer", ["../../etc", "/etc", "step_000002/../../..", "garbage\n"])
def test_latest_must_name_a_step_folder_inside_the_run(ws, tmp_path, pointer):
    run = copy_run(ws / "done", tmp_path / "run")
    (run / "checkpoints" / "latest").write_text(pointer)
    shutil.copytree(run / "checkpoints" / "step_000002", run / "checkpoints" / "step_000001")
    before = snapshot(run)
    keep = "log.keep_checkpoints=1"  # nothing is pruned on the word of a bad pointer
    rc, _, err = cli("train", "--resume", str(run), "--set", "trainer.steps=3", "--set", keep)
    refused(rc, err, "not a step_* folder of this run")
    assert snapshot(run) == before


def test_step_folder_linking_outside_the_run_is_refused(ws, tmp_path):
    run = copy_run(ws / "done", tmp_path / "run")
    outside = shutil.copytree(run / "checkpoints" / "step_000002", tmp_path / "elsewhere")
    (run / "checkpoints" / "step_000003").symlink_to(outside)
    (run / "checkpoints" / "latest").write_text("step_000003")
    rc, _, err = cli("train", "--resume", str(run), "--set", "trainer.steps=4")
    refused(rc, err, "links outside the run directory")


@pytest.mark.parametrize(
    "name, damage",
    [
        ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100])),
        ("state.safetensors", lambda p: p.write_bytes(b"garbage" * 10)),
        ("state.json", lambda p: p.write_text('{"__dict__": [[')),
        ("model.safetensors", lambda p: p.unlink()),
    ],
)
def test_damaged_checkpoint_files(ws, tmp_path, name, damage):
    run = copy_run(ws / "done", tmp_path / "run")
    damage(run / "checkpoints" / "step_000002" / name)
    before = snapshot(run)
    rc, _, err = cli("train", "--resume", str(run), "--set", "trainer.steps=3")
    refused(rc, err, f"{run / 'checkpoints' / 'step_000002' / name}")
    assert "earlier step_* folder" in err
    assert snapshot(run) == before


def test_left_over_temporary_checkpoint_folders_are_removed(ws, tmp_path):
    run = copy_run(ws / "done", tmp_path / "run")
    ckpts = run / "checkpoints"
    for name in (".step_000003.k2j4.tmp", ".step_000001.pruned"):
        (ckpts / name).mkdir()
        (ckpts / name / "model.safetensors").write_bytes(b"partial")
    rc, _, err = cli("train", "--resume", str(run))
    assert rc == 0, err
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000002"]


def test_a_checkpoint_set_aside_by_a_killed_resave_is_put_back(ws, tmp_path):
    """A re-save of a step moves the old folder aside before renaming the new one in; killed in
    between, the next start puts the old one back."""
    run = copy_run(ws / "done", tmp_path / "run")
    before = snapshot(run)
    ckpts = run / "checkpoints"
    (ckpts / "step_000002").rename(ckpts / ".step_000002.old")
    rc, _, err = cli("train", "--resume", str(run))
    assert rc == 0, err
    assert snapshot(run) == before


# -- errors at run time --------------------------------------------------------------------
def test_reward_failing_on_most_samples_stops_the_run(ws, tmp_path):
    from grpo_ar.rewards import REWARDS, per_sample, register_reward

    if "always_broken" not in REWARDS:

        @register_reward("always_broken")
        @per_sample
        def always_broken(output: str) -> float:
            raise RuntimeError("the judge is down")

    data = tmp_path / "train.jsonl"
    write_rows(data, [{"prompt": f"{a}+{b}=", "rewards": "always_broken"} for a, b in PROBLEMS])
    rc, _, err = cli("train", str(new_config(ws, tmp_path)), "--set", f"data.train={data}")
    refused(rc, err, "step 1: 4 of 4 samples got no reward", code=1)
    assert "the judge is down" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_disk_full_and_permission_errors_are_one_line():
    import errno

    from safetensors import SafetensorError

    written = 'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    code, msg = explain(SafetensorError(f"Error while serializing: {written}"))
    assert code == 1 and "disk full" in msg
    code, msg = explain(OSError(errno.ENOSPC, "No space left on device", "/r/metrics.jsonl"))
    assert code == 1 and msg.startswith("disk full writing /r/metrics.jsonl") and "--resume" in msg
    code, msg = explain(PermissionError(errno.EACCES, "Permission denied", "/r/x"))
    assert code == 2 and "no permission to use /r/x" in msg
    code, msg = explain(KeyError("boom"))
    assert code == 1 and "--debug" in msg


def test_free_space_is_checked(tmp_path):
    from grpo_ar.errors import ConfigError
    from grpo_ar.train.preflight import check_free_space

    check_free_space(tmp_path, 1)
    with pytest.raises(ConfigError, match="a checkpoint needs about 953674316 MiB"):
        check_free_space(tmp_path, 10**15)


def test_optimizer_is_not_imported_from_the_working_directory(tmp_path, monkeypatch):
    from grpo_ar.errors import ConfigError
    from grpo_ar.train.step import import_object

    (tmp_path / "evil_opt.py").write_text(
        "import pathlib, torch\npathlib.Path('ran').write_text('x')\nOpt = torch.optim.SGD\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend("")  # what `python -m grpo_ar.cli` does
    with pytest.raises(ConfigError, match="cannot import 'evil_opt.Opt'"):
        import_object("evil_opt.Opt")
    assert not (tmp_path / "ran").exists()
    monkeypatch.setenv("GRPO_AR_IMPORT_CWD", "1")  # asked for: allowed
    assert import_object("evil_opt.Opt") is torch.optim.SGD
    sys.modules.pop("evil_opt", None)


# -- report --------------------------------------------------------------------------------
def test_report_skips_a_cut_last_line(ws, tmp_path, caplog):
    run = copy_run(ws / "done", tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward/me')
    rc, out, err = cli("report", str(run))
    assert rc == 0, err
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["1", "2"]
    assert "skipping a cut last line" in caplog.text


def test_report_refuses_a_damaged_middle_line(ws, tmp_path):
    run = copy_run(ws / "done", tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(["{oops", *lines]) + "\n")
    rc, _, err = cli("report", str(run))
    refused(rc, err, f"{run / 'metrics.jsonl'}:1: not valid JSON")


# -- the real process ----------------------------------------------------------------------
def test_cli_subprocess_prints_one_line_and_a_traceback_only_with_debug(ws, tmp_path):
    cfg = new_config(ws, tmp_path)
    cfg.write_text(cfg.read_text().replace("steps = 2", "steps = 2 2"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("GRPO_AR_DEBUG", None)
    cmd = [PY, "-m", "grpo_ar.cli", "train", str(cfg)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]  # exactly one line
    assert p.stderr.startswith(f"grpo-ar: error: {cfg}:")
    rc, _, err = cli("train", str(cfg), "--debug")  # in-process: the same main()
    assert rc == 2
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("grpo-ar: error:")
