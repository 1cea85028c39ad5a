"""Model-work scheduling on a real loopback server: dynamic batching gives the unbatched results,
a full queue answers 503 at once, abandoned and late work is dropped, /healthz stays fast."""

from __future__ import annotations

import io
import json
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from app.protocol import wire
from app.http.app import create_app, default_model_threads
from app.http.registry import ModelRegistry
from app.http.settings import Settings
from models.vae import imaging
from models.vae.inference import VAEModel
from support import gradient_image, live_server


def metric(base: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(requests.get(base + "/metrics", timeout=5).text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def serve(model: VAEModel, **settings):
    # One model worker unless a test asks for more: these tests count what queues behind it.
    settings = {"model_threads": 1, **settings}
    return live_server(create_app(Settings(warmup=False, **settings), ModelRegistry([model])))


class Gate:
    """Holds the model's decode until released, counting calls: a model as slow as we like."""

    def __init__(self, model: VAEModel):
        self.entered, self.open, self.calls = threading.Event(), threading.Event(), 0
        inner = model.decode

        def decode(*args, **kwargs):
            self.calls += 1
            self.entered.set()
            assert self.open.wait(30), "gate never opened"
            return inner(*args, **kwargs)

        model.decode = decode


@pytest.fixture
def model(tiny_vae_dir):
    return VAEModel.load("tiny", tiny_vae_dir)


def post_latents(base: str, z: torch.Tensor, timeout=30, **params) -> requests.Response:
    return requests.post(
        base + "/decode", data=wire.tensor_to_raw(z), timeout=timeout,
        params={"shape": json.dumps(list(z.shape)), "dtype": "float32", "output_type": "pt", **params},
        headers={"Content-Type": "tensor/binary"},
    )


def tensor_of(r: requests.Response) -> torch.Tensor:
    assert r.status_code == 200, r.text
    return wire.tensor_from_raw(r.content, tuple(json.loads(r.headers["shape"])), wire.parse_dtype(r.headers["dtype"]))


def png(seed: int, size=(40, 32)) -> bytes:
    return imaging.encode_image(gradient_image(*size, seed=seed), "png")


# --- dynamic batching ---------------------------------------------------------------------------

def test_batched_results_equal_unbatched(model):
    """Four concurrent requests per op coalesce into one forward pass. Tolerance: batched convs may
    pick other kernels, so float results may differ in the last bits (|diff| <= 1e-5) and uint8
    pixels by one step; in practice they are usually identical."""
    zs = [torch.randn(1, 4, 4, 5, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    images = [png(i) for i in range(4)]
    want_decode = [model.decode(z) for z in zs]
    want_encode = [model.encode(imaging.to_tensor(imaging.open_image(b))) for b in images]
    want_round = [imaging.to_uint8(model.decode(e, (32, 40)))[0].numpy() for e in want_encode]
    with serve(model, max_batch_size=4, batch_wait_ms=1000) as base, ThreadPoolExecutor(4) as pool:
        decoded = list(pool.map(lambda z: tensor_of(post_latents(base, z)), zs))
        encoded = list(pool.map(lambda b: tensor_of(requests.post(
            base + "/encode", data=b, headers={"Content-Type": "image/png"}, timeout=30)), images))
        rounds = list(pool.map(lambda b: requests.post(
            base + "/roundtrip", data=b, headers={"Content-Type": "image/png"}, timeout=30), images))
        assert metric(base, "vae_batch_size_count") == 3, "12 requests should have run as 3 batches of 4"
        assert metric(base, "vae_batch_size_sum") == 12
    for got, want in zip(decoded, want_decode):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for got, want in zip(encoded, want_encode):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for r, want in zip(rounds, want_round):
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)
        assert np.abs(got - want.astype(int)).max() <= 1


def test_different_shapes_and_parameters_do_not_share_a_batch(model):
    zs = [torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 6), torch.randn(1, 4, 4, 4)]
    params = [{}, {}, {"scaling_factor": 0.5}]
    with serve(model, max_batch_size=8, batch_wait_ms=300) as base, ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda zp: tensor_of(post_latents(base, zp[0], **zp[1])), zip(zs, params)))
        assert metric(base, "vae_batch_size_sum") == 3 and metric(base, "vae_batch_size_count") == 3
    torch.testing.assert_close(results[2], model.decode(zs[2] / 0.5), atol=1e-5, rtol=0)


# --- backpressure -------------------------------------------------------------------------------

def test_overload_gets_503_at_once_and_healthz_stays_fast(model):
    gate = Gate(model)
    z = torch.randn(1, 4, 4, 4)
    with serve(model, max_queue=2, max_batch_size=1) as base, ThreadPoolExecutor(12) as pool:
        first = pool.submit(post_latents, base, z)
        assert gate.entered.wait(10)  # one request holds the only worker

        def timed():
            t0 = time.monotonic()
            r = post_latents(base, z)
            return r, time.monotonic() - t0

        rest = [pool.submit(timed) for _ in range(8)]
        deadline = time.monotonic() + 10
        while sum(f.done() for f in rest) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        done = [f.result() for f in rest if f.done()]
        refused = [(r, t) for r, t in done if r.status_code == 503]
        assert len(refused) == 6, [r.status_code for r, _ in done]  # 8 - max_queue
        slowest = max(t for _, t in refused)
        print(f"\n503 answered in at most {slowest * 1000:.1f} ms while the model was busy")
        assert slowest < 2.0
        for r, _ in refused:
            assert r.json()["error"]["type"] == "unavailable" and int(r.headers["Retry-After"]) >= 1
        t0 = time.monotonic()
        assert requests.get(base + "/healthz", timeout=5).status_code == 200
        assert time.monotonic() - t0 < 0.5
        assert metric(base, "vae_queue_depth") == 2
        assert metric(base, "vae_rejected_total", reason="queue_full") == 6
        gate.open.set()
        assert first.result().status_code == 200
        assert all(f.result()[0].status_code in (200, 503) for f in rest)
        assert sum(f.result()[0].status_code == 200 for f in rest) == 2  # the queued ones: none lost
        assert gate.calls == 3


def _send_and_hang_up(base: str, z: torch.Tensor) -> None:
    """A raw HTTP request whose client closes the connection without reading the answer."""
    url = urlparse(base)
    body = wire.tensor_to_raw(z)
    head = (f"POST /decode?shape={','.join(map(str, z.shape))}&dtype=float32&output_type=pt HTTP/1.1\r\n"
            f"Host: x\r\nContent-Type: tensor/binary\r\nContent-Length: {len(body)}\r\n\r\n")
    with socket.create_connection((url.hostname, url.port)) as s:
        s.sendall(head.encode() + body)
        time.sleep(0.3)  # parsed and queued by now


def test_disconnected_client_work_is_dropped(model):
    gate = Gate(model)
    z = torch.randn(1, 4, 4, 4)
    with serve(model, max_batch_size=1) as base, ThreadPoolExecutor(2) as pool:
        first = pool.submit(post_latents, base, z)
        assert gate.entered.wait(10)
        _send_and_hang_up(base, z)
        deadline = time.monotonic() + 10
        while metric(base, "vae_rejected_total", reason="client_gone") < 1:
            assert time.monotonic() < deadline, "the abandoned request was not dropped"
            time.sleep(0.05)
        assert metric(base, "vae_queue_depth") == 0
        gate.open.set()
        assert first.result().status_code == 200
        time.sleep(0.2)
        assert gate.calls == 1  # the abandoned decode never reached the model


def test_deadline_gives_504_and_drops_queued_work(model):
    gate = Gate(model)
    z = torch.randn(1, 4, 4, 4)
    with serve(model, max_batch_size=1, request_timeout=0.5) as base, ThreadPoolExecutor(2) as pool:
        running = pool.submit(post_latents, base, z)
        assert gate.entered.wait(10)
        t0 = time.monotonic()
        queued = post_latents(base, z)
        assert queued.status_code == 504 and queued.json()["error"]["type"] == "deadline_exceeded"
        assert time.monotonic() - t0 < 3
        assert running.result().status_code == 504  # its model call goes on, its answer is not awaited
        gate.open.set()
        time.sleep(0.2)
        assert gate.calls == 1
        assert metric(base, "vae_rejected_total", reason="deadline") == 1  # only the queued one was dropped
        assert post_latents(base, z).status_code == 200  # and the server carries on


# --- running work stops at the next frame or tile (issue 12, finding 4) ------------------------

class SlowFrames:
    """Each model.decode call (one /sample frame) takes `seconds`; counts the calls that ran."""

    def __init__(self, model: VAEModel, seconds: float):
        self.ran = 0
        inner = model.decode

        def decode(*args, **kwargs):
            time.sleep(seconds)
            out = inner(*args, **kwargs)  # its decoder checks tiling.stop_when first
            self.ran += 1
            return out

        model.decode = decode


def _sample_and_hang_up(base: str, n: int) -> None:
    url = urlparse(base)
    with socket.create_connection((url.hostname, url.port)) as s:
        s.sendall(f"POST /sample?n={n}&width=16&height=16 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
        time.sleep(1.0)  # frames are running by now


@pytest.mark.parametrize("how", ["deadline", "client_gone"])
def test_abandoned_running_work_stops_at_the_next_frame_and_frees_the_slot(model, how):
    slow = SlowFrames(model, 0.5)
    z = torch.randn(1, 4, 2, 2)
    with serve(model, max_batch_size=1, request_timeout=2.0 if how == "deadline" else 300) as base:
        t0 = time.monotonic()
        if how == "deadline":
            r = requests.post(base + "/sample", params={"n": 16, "width": 16, "height": 16}, timeout=30)
            assert r.status_code == 504
        else:
            _sample_and_hang_up(base, 16)
        # 16 frames would hold the only slot for 16 x 0.5 s; stopped, it frees it within a frame.
        after = post_latents(base, z)
        took = time.monotonic() - t0
        assert after.status_code == 200, after.text
        assert slow.ran < 8, slow.ran
        assert took < 16 * 0.5, took
        print(f"\n{how}: {slow.ran} of 16 frames ran; the next request was answered {took:.2f} s after the first began")


# --- the event loop stays free ----------------------------------------------------------------

def test_healthz_is_fast_while_the_model_is_saturated(model):
    image = png(0, size=(256, 256))
    stop = threading.Event()
    statuses: list[int] = []

    def hammer():
        while not stop.is_set():
            statuses.append(requests.post(base + "/roundtrip", data=image, timeout=60,
                                          headers={"Content-Type": "image/png"}).status_code)

    with serve(model, max_queue=64) as base, ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(hammer)
        time.sleep(0.5)
        latencies = []
        for _ in range(30):
            t0 = time.monotonic()
            assert requests.get(base + "/healthz", timeout=5).status_code == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.05)
        busy = metric(base, "vae_model_in_flight") + metric(base, "vae_queue_depth")
        stop.set()
    print(f"\n/healthz under saturation: median {statistics.median(latencies) * 1000:.1f} ms, "
          f"max {max(latencies) * 1000:.1f} ms over {len(latencies)} probes; {len(statuses)} roundtrips")
    assert busy >= 1 and statuses and set(statuses) == {200}
    assert statistics.median(latencies) < 0.5 and max(latencies) < 1.0  # generous for shared CI cores


def test_cpu_default_runs_one_model_call_per_core(model):
    """On CPU the default is one concurrent model call per torch thread (at most 4): two requests
    are inside the model at the same time, each with its share of the threads."""
    assert default_model_threads(Settings(torch_threads=2)) == 2
    assert default_model_threads(Settings(torch_threads=16)) == 4
    assert default_model_threads(Settings(torch_threads=16, device="cuda")) == 1
    assert default_model_threads(Settings(torch_threads=16, model_threads=3)) == 3
    inside, seen = threading.Barrier(2, timeout=20), []
    conv_out = model.vae.decoder.conv_out
    # Both requests must reach the last layer together (else BrokenBarrierError, a 500), and then
    # the share's own pre-hook (between these two) gives each call its half.
    def together(module, args):
        inside.wait()

    conv_out.register_forward_pre_hook(together, prepend=True)
    conv_out.register_forward_pre_hook(lambda m, a: seen.append(torch.get_num_threads()))
    conv_out.register_forward_pre_hook(together)  # neither call ends before both have looked
    z = torch.randn(1, 4, 4, 4)
    with serve(model, model_threads=None, torch_threads=2) as base, ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: post_latents(base, z), range(2)))
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    assert seen == [1, 1]  # 2 threads shared by 2 calls
