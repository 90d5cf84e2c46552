"""`grpo-ar vllm-serve MODEL`: a vLLM engine in its own process and environment, and the
trainer's client (TRL's `vllm_mode = "server"`).

Transport: a local socket (`multiprocessing.connection`, authenticated with
GRPO_AR_VLLM_KEY) carries small pickled requests; weights travel through shared memory (one
`torch.save` file under /dev/shm per push, memory-mapped by the server and deleted after), so the
trainer's environment needs neither vLLM nor a process group. Requests of several clients (data
parallel ranks sharing one server) are served one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import tempfile
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .vllm_engine import SIGNATURE_KEYS, EngineSpec


def authkey() -> bytes:
    return os.environ.get("GRPO_AR_VLLM_KEY", "grpo-ar-vllm").encode()


def folder_signature(model_dir: str) -> dict[str, Any]:
    """The shape-identifying fields of a model folder's config.json (as `model_signature`)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return {k: cfg.get(k) for k in SIGNATURE_KEYS}


class Server:
    """Answers requests against one engine: health, generate, load_weights, reset."""

    def __init__(self, spec: EngineSpec) -> None:
        from .vllm_engine import Engine

        self.spec, self.engine, self.lock = spec, Engine(spec), threading.Lock()
        self.signature = folder_signature(spec.model_dir)

    def answer(self, msg: tuple) -> Any:
        op, *args = msg
        with self.lock:
            if op == "health":
                return {
                    "model_dir": self.spec.model_dir,
                    "signature": self.signature,
                    "dtype": self.spec.dtype,
                    "version": self.engine.version,
                    "start_s": self.engine.start_s,
                }
            if op == "generate":
                return self.engine.generate(*args)
            if op == "load_weights":
                path, version = args
                weights = torch.load(path, mmap=True, weights_only=True)
                self.engine.load_weights(weights.items(), version)
                return version
            if op == "reset":
                return self.engine.reset()
        raise ValueError(f"unknown request {op!r}")

    def handle(self, conn: Connection) -> None:
        with conn:
            while True:
                try:
                    msg = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    return
                try:
                    reply = ("ok", self.answer(msg))
                except Exception as e:  # the client raises it; the server keeps serving
                    reply = ("error", f"{type(e).__name__}: {e}")
                conn.send_bytes(pickle.dumps(reply))

    def serve_forever(self, host: str, port: int) -> None:
        with Listener((host, port), authkey=authkey()) as listener:
            print(f"grpo-ar vllm-serve: ready on {host}:{port}", flush=True)
            while True:
                conn = listener.accept()
                threading.Thread(target=self.handle, args=(conn,), daemon=True).start()


class ServerClient:
    """The trainer's side: the engine interface (generate, load_weights, reset) over the socket,
    every answer awaited at most `timeout_s`."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.where, self.timeout_s = f"{host}:{port}", timeout_s
        try:
            self.conn = Client((host, port), authkey=authkey())
        except OSError as e:
            raise ConfigError(
                f"no vllm server at {self.where} ({e}): start `grpo-ar vllm-serve MODEL --port "
                f"{port}` with .venv-vllm/bin/python, or set rollout.host / rollout.port"
            ) from None
        self.health = self.call("health")
        self.version = self.health["version"]

    def call(self, *msg: Any) -> Any:
        try:
            self.conn.send_bytes(pickle.dumps(msg))
            if not self.conn.poll(self.timeout_s):
                raise RuntimeError(
                    f"the vllm server at {self.where} did not answer {msg[0]!r} within "
                    f"rollout.timeout_s={self.timeout_s:g} s; raise it or check the server"
                )
            status, value = pickle.loads(self.conn.recv_bytes())
        except (EOFError, ConnectionError, BrokenPipeError) as e:
            raise RuntimeError(
                f"the vllm server at {self.where} is gone ({type(e).__name__}); restart "
                "`grpo-ar vllm-serve` and resume the run"
            ) from None
        if status == "error":
            raise RuntimeError(f"the vllm server at {self.where} failed on {msg[0]!r}: {value}")
        return value

    def check_model(self, signature: dict[str, Any], dtype: str) -> None:
        """Refuse a server started on another model (or with another dtype)."""
        theirs = self.health["signature"]
        if theirs != signature:
            diff = {k: (theirs.get(k), v) for k, v in signature.items() if theirs.get(k) != v}
            raise ConfigError(
                f"the vllm server at {self.where} serves another model ({self.health['model_dir']}; "
                f"server vs trainer: {diff}); start it on the trainer's model"
            )
        if self.health["dtype"] != dtype:
            raise ConfigError(
                f"the vllm server at {self.where} runs {self.health['dtype']}, rollout.dtype "
                f"asks {dtype}; restart it with --dtype {dtype} or set rollout.dtype"
            )

    def generate(self, prompts: list, n: int, kw: dict | list[dict], seed: int) -> list:
        return self.call("generate", prompts, n, kw, seed)

    def load_weights(self, items: list[tuple[str, torch.Tensor]], version: int) -> None:
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        fd, path = tempfile.mkstemp(prefix="grpo_ar_weights_", suffix=".pt", dir=shm)
        os.close(fd)
        try:
            torch.save({k: v.contiguous() for k, v in items}, path)
            self.version = self.call("load_weights", path, version)
        finally:
            os.unlink(path)

    def reset(self) -> None:
        self.call("reset")

    def close(self) -> None:
        self.conn.close()


def spawn_server(
    python: str,
    model_dir: str,
    port: int,
    log_path: str,
    args: tuple[str, ...] = (),
    wait_s: float = 600,
) -> tuple[subprocess.Popen, float]:
    """Start `grpo-ar vllm-serve` with interpreter `python` (e.g. .venv-vllm/bin/python), its
    output in `log_path`; returns (process, seconds until it listened)."""
    cmd = [python, "-m", "grpo_ar.cli", "vllm-serve", model_dir, "--port", str(port), *args]
    with open(log_path, "w") as out:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    start = time.perf_counter()
    while "ready on" not in Path(log_path).read_text():
        if proc.poll() is not None:
            raise RuntimeError(f"vllm-serve exited before it was ready; its log: {log_path}")
        if time.perf_counter() - start > wait_s:
            proc.kill()
            raise RuntimeError(f"vllm-serve not ready after {wait_s:g} s; its log: {log_path}")
        time.sleep(0.5)
    return proc, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """`grpo-ar vllm-serve MODEL [--host H] [--port P] [--dtype D] ...`"""
    p = argparse.ArgumentParser(prog="grpo-ar vllm-serve", description=__doc__.split("\n")[0])
    p.add_argument("model", help="transformers model folder the engine starts from")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--kv-cache-gb", type=float, default=2.0)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compile",
        default="auto",
        choices=("auto", "on", "off"),
        help="vLLM's compiled path (CUDA graphs on a GPU); auto: on with CUDA, off on CPU",
    )
    a = p.parse_args(argv)
    if not (Path(a.model) / "config.json").exists():
        p.error(f"{a.model} is not a transformers model folder (no config.json)")
    spec = EngineSpec(
        model_dir=a.model,
        dtype=a.dtype,
        kv_cache_gb=a.kv_cache_gb,
        gpu_memory_utilization=a.gpu_memory_utilization,
        max_num_seqs=a.max_num_seqs,
        max_model_len=a.max_model_len,
        seed=a.seed,
        compile={"auto": None, "on": True, "off": False}[a.compile],
    )
    start = time.perf_counter()
    server = Server(spec)
    print(f"grpo-ar vllm-serve: engine started in {time.perf_counter() - start:.1f} s", flush=True)
    server.serve_forever(a.host, a.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
