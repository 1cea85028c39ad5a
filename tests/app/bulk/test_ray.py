"""The Ray paths on a local Ray instance: `vae encode --ray` (Ray Data) and `vae serve --ray` (Ray Serve).

Ray is an optional extra (`pip install -e ".[ray]"`); without it these tests are skipped.
"""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from app.http import ray_serve
from app.http.settings import Settings
from models.vae import imaging
from models.vae.inference import VAEModel
from support import reference_roundtrip, run

SKIP = "Ray is an optional extra: pip install -e '.[ray]' to run the Ray tests"


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason=SKIP)
    pytest.importorskip("ray.data", reason=SKIP)
    pytest.importorskip("ray.serve", reason=SKIP)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # Ray gives each actor one CPU, so torch runs one thread there. Float results are bit-identical
    # only at equal thread counts (the reduction order of a conv depends on it): run the local
    # path with one thread too, whatever OMP_NUM_THREADS the test run has.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    ray.shutdown()


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ray_data_encode_writes_identical_files(local_ray, bulk_inputs, tiny_vae_dir, tmp_path):
    model = ["--model", f"tiny={tiny_vae_dir}", "--batch-size", "2"]
    for label, extra in {"files": [], "shards": ["--shard-size", "3", "--quantize", "uint8"]}.items():
        local, remote = tmp_path / f"{label}-local", tmp_path / f"{label}-ray"
        rc_local, rep_local = run("encode", bulk_inputs, "--out", local, *model, *extra, report=tmp_path / "l.json")
        rc_ray, rep_ray = run("encode", bulk_inputs, "--out", remote, *model, *extra, "--ray", "--actors", "2",
                              report=tmp_path / "r.json")
        assert rc_local == rc_ray == 1  # broken.png, reported by both
        assert rep_ray["failures"] == rep_local["failures"]
        assert (rep_ray["done"], rep_ray["bytes_out"]) == (7, rep_local["bytes_out"])
        a, b = files_of(local), files_of(remote)
        assert len(a) == (7 if label == "files" else 3) and a.keys() == b.keys()
        assert a == b, f"{label}: the Ray path wrote different bytes"
    # A rerun through Ray skips everything, like the local path.
    rc, rep = run("encode", bulk_inputs, "--out", tmp_path / "files-ray", *model, "--ray", report=tmp_path / "again.json")
    assert (rep["skipped"], rep["done"]) == (7, 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_serve_deploys_the_same_app(local_ray, bulk_inputs, tiny_vae_dir):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        settings = Settings(models=[f"tiny={tiny_vae_dir}"])
        serve.run(ray_serve.build_application(settings, {"replicas": 1, "num_cpus": 0.5}),
                  name="vae", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        assert requests.get(f"{url}/readyz", timeout=30).json()["status"] == "ready"  # lifespan ran
        model = VAEModel.load("tiny", tiny_vae_dir)
        assert requests.get(f"{url}/v1/models", timeout=30).json()["models"][0]["sha256"] == model.sha256

        path = bulk_inputs / "odd" / "gradient.png"
        response = requests.post(f"{url}/roundtrip", data=path.read_bytes(), timeout=60)
        assert response.status_code == 200, response.text
        got = np.asarray(Image.open(io.BytesIO(response.content)))
        np.testing.assert_array_equal(got, reference_roundtrip(model, path))
        assert json.loads(response.headers["X-Latent-Shape"]) == [1, 4, 4, 5]

        response = requests.post(f"{url}/encode", data=path.read_bytes(), timeout=60)
        z = torch.frombuffer(bytearray(response.content), dtype=torch.float32).reshape(json.loads(response.headers["shape"]))
        torch.testing.assert_close(z, model.encode(imaging.to_tensor(imaging.open_image(path))), rtol=0, atol=1e-5)
        bad = requests.post(f"{url}/encode", data=b"not an image", timeout=30)
        assert bad.status_code == 415 and bad.json()["error"]["type"]
    finally:
        serve.shutdown()


def test_deployment_options_and_cli_flags():
    """Pure functions, no Ray needed: replicas, autoscaling, per-replica devices, `vae serve` flags."""
    fixed = ray_serve.deployment_options({"replicas": 3, "num_cpus": 2}, "cpu")
    assert fixed["num_replicas"] == 3 and fixed["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0}
    auto = ray_serve.deployment_options({"min_replicas": 1, "max_replicas": 4}, "cuda")
    assert "num_replicas" not in auto and auto["autoscaling_config"]["max_replicas"] == 4
    assert auto["ray_actor_options"]["num_gpus"] == 1  # one GPU per replica with --device cuda
    from app.cli.serve import build_parser

    args = build_parser(Settings()).parse_args(["--ray", "--max-replicas", "4", "--num-gpus", "0.5"])
    assert args.ray and args.max_replicas == 4 and args.num_gpus == 0.5
