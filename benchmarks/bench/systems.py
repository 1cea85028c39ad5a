"""Systems under test: in-process diffusers / VAEModel, and `vae serve` in a subprocess over HTTP."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import torch

from benchmarks.bench.inputs import ROOT
from benchmarks.bench.inputs import ModelSpec
from models.vae.inference import diffusers_latents


def load_reference(path):
    """The in-process diffusers baseline: the class the folder's config names (AutoencoderKL or
    AutoencoderTiny), float32, eager."""
    from diffusers import AutoencoderKL

    from models.vae.loading import model_class

    return model_class(AutoencoderKL.load_config(str(path)), path).from_pretrained(str(path), local_files_only=True).eval()


class InProcess:
    """diffusers AutoencoderKL / AutoencoderTiny (baseline) or our VAEModel, called with tensors."""

    def __init__(self, mode: str, model: ModelSpec):
        self.mode = mode
        if mode == "diffusers-fp32":
            self.vae = load_reference(model.path)
            self.ours = None
        else:
            from models.vae.inference import VAEModel

            self.ours = VAEModel.load(model.name, model.path, dtype="bfloat16" if "bf16" in mode else "float32")

    def pid(self):
        return "self"

    def call(self, op: str, x: torch.Tensor, z: torch.Tensor):
        with torch.inference_mode():
            if self.ours is None:
                if op == "encode":
                    return diffusers_latents(self.vae, x)
                if op == "decode":
                    return self.vae.decode(z).sample
                return self.vae.decode(diffusers_latents(self.vae, x)).sample
            if op == "encode":
                return self.ours.encode(x)
            if op == "decode":
                return self.ours.decode(z)
            return self.ours.decode(self.ours.encode(x))

    def close(self):
        pass


class Server:
    """`vae serve` in a subprocess on a free loopback port."""

    def __init__(self, model: ModelSpec, *extra: str, max_pixels: int = 4096 * 4096, ready_timeout: float = 900):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "app.cli.serve", "--model", f"{model.name}={model.path}", "--port", str(self.port),
               "--max-pixels", str(max_pixels), "--max-body-bytes", str(512 * 2**20), "--log-level", "warning", *extra]
        env = {**os.environ, "VAE_REQUEST_TIMEOUT": "7200", "VAE_MAX_QUEUE": "256", "VAE_LOG_FORMAT": "text"}
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.cmd = cmd
        import requests

        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited ({self.proc.returncode}): {self.log.read().decode()[-2000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("server not ready in time")
            time.sleep(0.2)
        self._local = threading.local()

    def pid(self):
        return self.proc.pid

    def _session(self):
        import requests

        if not hasattr(self._local, "s"):
            self._local.s = requests.Session()
        return self._local.s

    def call(self, op: str, png: bytes, z: torch.Tensor):
        s = self._session()
        if op == "decode":
            params = [("shape", str(d)) for d in z.shape] + [("dtype", "float32"), ("output_type", "pil"),
                                                               ("image_format", "png")]
            r = s.post(self.url + "/decode", params=params, data=z.numpy().tobytes(),
                       headers={"Content-Type": "tensor/binary"}, timeout=7200)
        else:
            r = s.post(f"{self.url}/{op}", data=png, headers={"Content-Type": "image/png"}, timeout=7200)
        if r.status_code != 200:
            raise RuntimeError(f"{op}: HTTP {r.status_code}: {r.text[:300]}")
        return r

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def make_system(mode: str, model: ModelSpec):
    if mode.startswith("http-"):
        extra = ["--dtype", "bfloat16" if "bf16" in mode else "float32"]
        if mode.endswith("-compile"):
            extra.append("--compile")
        return Server(model, *extra)
    return InProcess(mode, model)
