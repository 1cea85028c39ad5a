"""models/vae/threads.py: concurrent model calls divide the torch threads, re-read every layer."""

from __future__ import annotations

import threading

import torch

from models.vae import threads
from models.vae.inference import VAEModel


def _record_threads(model: VAEModel) -> list[int]:
    """torch.get_num_threads() as seen by the decoder's last convolution, one entry per decode."""
    seen: list[int] = []
    model.vae.decoder.conv_out.register_forward_pre_hook(lambda m, a: seen.append(torch.get_num_threads()))
    return seen


def _in_thread(fn):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("v", fn()))
    t.start()
    t.join(60)
    return out["v"]


def test_a_call_alone_gets_every_thread_and_two_calls_get_half_each(tiny_vae_dir):
    model = VAEModel.load("tiny", tiny_vae_dir)
    seen = _record_threads(model)
    share = threads.ThreadShare(4)
    z = torch.randn(1, 4, 4, 4)

    def decode_in_call():
        torch.set_num_threads(3)  # whatever the thread had: the share decides inside call()
        with share.call():
            model.decode(z)
        return torch.get_num_threads()

    _in_thread(decode_in_call)
    assert seen[-1] == 4  # alone: all of them

    inside, leave = threading.Event(), threading.Event()

    def other_call():  # a second call in progress on another thread
        with share.call():
            inside.set()
            leave.wait(60)

    other = threading.Thread(target=other_call)
    other.start()
    assert inside.wait(30)
    try:
        _in_thread(decode_in_call)
        assert seen[-1] == 2 and share.active == 1  # beside another call: half
    finally:
        leave.set()
        other.join(30)
    assert share.active == 0


def test_a_running_call_gives_threads_back_at_the_next_layer(tiny_vae_dir):
    """The share is re-read before every layer: a call that started alone drops to its half as
    soon as a second call enters, within the same forward pass."""
    model = VAEModel.load("tiny", tiny_vae_dir)
    share = threads.ThreadShare(2)
    per_layer: list[int] = []
    entered, leave = threading.Event(), threading.Event()

    def second_call():
        with share.call():
            entered.set()
            leave.wait(60)

    def spy(module, args):
        per_layer.append(torch.get_num_threads())
        if len(per_layer) == 1:  # first layer: another call starts now and stays
            threading.Thread(target=second_call, daemon=True).start()
            assert entered.wait(30)

    def first_call():
        with share.call():
            model.decode(torch.randn(1, 4, 4, 4))

    model.vae.decoder.conv_in.register_forward_pre_hook(spy)
    model.vae.decoder.conv_out.register_forward_pre_hook(spy)
    try:
        _in_thread(first_call)
    finally:
        leave.set()
    assert per_layer == [2, 1]


def test_hooks_do_nothing_outside_a_call(tiny_vae_dir):
    """In-process use (tests, bulk jobs, training) keeps the thread's own torch setting."""
    model = VAEModel.load("tiny", tiny_vae_dir)
    seen = _record_threads(model)

    def run():
        torch.set_num_threads(1)
        model.decode(torch.randn(1, 4, 4, 4))
        return torch.get_num_threads()

    assert _in_thread(run) == 1 and seen == [1]


def test_results_do_not_depend_on_the_share(tiny_vae_dir):
    model = VAEModel.load("tiny", tiny_vae_dir)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    want = model.decode(z)
    share = threads.ThreadShare(2)

    def run():
        with share.call():
            return model.decode(z)

    torch.testing.assert_close(_in_thread(run), want, rtol=1e-5, atol=1e-5)
