"""models.vae.latent_files: the latent file format, quantisation, atomic writes and tar shards."""

from __future__ import annotations

import json
import tarfile

import pytest
import safetensors.torch
import torch

from models.vae import latent_files as ls

OPTIONS = dict(model="tiny", model_sha256="ab" * 32, scaling_factor=0.5, shift_factor=0.1)


def latents(seed: int = 0, shape=(1, 4, 6, 5)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 3 + torch.arange(4).view(1, 4, 1, 1)


@pytest.mark.parametrize("dtype,tol", [("float32", 0.0), ("float16", 2e-3), ("bfloat16", 2e-2)])
def test_float_round_trip_and_metadata(dtype, tol):
    z = latents()
    data = ls.encode_record(z, ls.StoreOptions(**OPTIONS, dtype=dtype), "a/b.png", (45, 38))
    stored = safetensors.torch.load(data)["latents"]  # readable by the reference library
    assert stored.dtype == ls.STORE_DTYPES[dtype] and stored.shape == (1, 4, 6, 5)
    back, meta = ls.decode_record(data)
    assert back.dtype == torch.float32
    assert torch.allclose(back, z, rtol=tol, atol=tol * 4)
    assert meta["source"] == "a/b.png" and meta["original_size"] == [45, 38]
    assert meta["model"] == "tiny" and meta["model_sha256"] == "ab" * 32
    assert meta["scaling_factor"] == 0.5 and meta["shift_factor"] == 0.1 and meta["scaled"] is False
    assert meta["dtype"] == dtype and meta["format"] == ls.FORMAT


def test_uint8_error_is_bounded_by_half_a_step():
    z = latents(1, (1, 4, 16, 12))
    data = ls.encode_record(z, ls.StoreOptions(**OPTIONS, quantize="uint8"), "x.png", (128, 96))
    stored = safetensors.torch.load(data)["latents"]
    assert stored.dtype == torch.uint8
    assert len(data) < z.numel() + 1024  # one byte per latent value plus the header
    back, meta = ls.decode_record(data)
    scale = torch.tensor(meta["quant_scale"]).view(1, 4, 1, 1)
    err = (back - z).abs()
    assert torch.all(err <= scale / 2 + 1e-6)
    assert err.max() > 0  # it is lossy: the bound is tight, not vacuous
    per_channel_range = z.amax(dim=(0, 2, 3)) - z.amin(dim=(0, 2, 3))
    assert torch.allclose(scale.flatten(), per_channel_range / 255, rtol=1e-5)


def test_constant_channel_quantises_exactly():
    z = torch.full((1, 4, 3, 3), 0.25)
    back, _ = ls.decode_record(ls.encode_record(z, ls.StoreOptions(**OPTIONS, quantize="uint8"), "c.png", (24, 24)))
    assert torch.equal(back, z)


def test_scaled_storage_is_undone_on_read():
    z = latents(2)
    data = ls.encode_record(z, ls.StoreOptions(**OPTIONS, dtype="float32", scaled=True), "s.png", (48, 40))
    stored = safetensors.torch.load(data)["latents"]
    assert torch.allclose(stored, (z - 0.1) * 0.5)
    back, meta = ls.decode_record(data)
    assert meta["scaled"] is True and torch.allclose(back, z, atol=1e-6)


def test_bytes_do_not_depend_on_the_process():
    """Sorted header: equal content gives equal bytes (Ray actors and the driver must agree)."""
    z = latents(3)
    opts = ls.StoreOptions(**OPTIONS)
    a = ls.encode_record(z, opts, "k.png", (48, 40))
    assert a == ls.encode_record(z.clone(), opts, "k.png", (48, 40))
    header_len = int.from_bytes(a[:8], "little")
    assert header_len % 8 == 0
    assert list(json.loads(a[8 : 8 + header_len])["__metadata__"]) == sorted(ls.header_metadata(a))


def test_bad_files_are_rejected_clearly():
    with pytest.raises(ls.LatentFormatError, match="safetensors"):
        ls.decode_record(b"not a safetensors file at all")
    plain = safetensors.torch.save({"latents": torch.zeros(1, 4, 2, 2)})
    with pytest.raises(ls.LatentFormatError, match="format"):
        ls.decode_record(plain)
    good = ls.encode_record(latents(), ls.StoreOptions(**OPTIONS), "t.png", (48, 40))
    with pytest.raises(ls.LatentFormatError):
        ls.decode_record(good[:-10])  # truncated data
    with pytest.raises(ValueError):
        ls.StoreOptions(**OPTIONS, dtype="float64")


def test_write_atomic_and_partials(tmp_path):
    target = tmp_path / "deep" / "x.bin"
    ls.write_atomic(target, b"abc")
    assert target.read_bytes() == b"abc"
    assert [p.name for p in target.parent.iterdir()] == ["x.bin"]
    (target.parent / f".y.bin.123{ls.PARTIAL}").write_bytes(b"half")  # what a kill -9 leaves behind
    assert ls.remove_partials(tmp_path) == 1
    assert [p.name for p in target.parent.iterdir()] == ["x.bin"]


def test_read_metadata_reads_only_the_header(tmp_path):
    path = tmp_path / "m.safetensors"
    ls.write_atomic(path, ls.encode_record(latents(), ls.StoreOptions(**OPTIONS), "m.png", (48, 40)))
    assert ls.read_metadata(path)["source"] == "m.png"
    assert ls.latent_path(tmp_path, "a/b.png") == tmp_path / "a" / "b.png.safetensors"


def test_shards(tmp_path):
    payloads = {f"dir/img.{i}.png": ls.encode_record(latents(i), ls.StoreOptions(**OPTIONS), f"dir/img.{i}.png", (48, 40))
                for i in range(5)}
    writer = ls.ShardWriter(tmp_path / "a", shard_size=2)
    for source, data in payloads.items():
        writer.add(ls.sample_key(source), data)
    assert sorted(p.name for p in (tmp_path / "a").iterdir())[-1].endswith(ls.PARTIAL)  # shard 2 in progress
    writer.close()
    shards = sorted((tmp_path / "a").iterdir())
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    names = ls.shard_members(shards[0])
    assert names == ["dir/img_0_png.safetensors", "dir/img_1_png.safetensors"]
    assert all(name.count(".") == 1 for s in shards for name in ls.shard_members(s))  # WebDataset keys
    read = {ls.decode_record(data)[1]["source"]: data for s in shards for _, data in ls.iter_shard(s)}
    assert read == payloads
    assert ls.ShardWriter(tmp_path / "a", 2).done_keys() == {ls.sample_key(s) for s in payloads}
    with tarfile.open(shards[0]) as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}
    # Same samples, another writer: byte-identical shards. A reopened writer continues the numbering.
    again = ls.ShardWriter(tmp_path / "b", shard_size=2)
    for source, data in payloads.items():
        again.add(ls.sample_key(source), data)
    again.close()
    assert [p.read_bytes() for p in shards] == [p.read_bytes() for p in sorted((tmp_path / "b").iterdir())]
    more = ls.ShardWriter(tmp_path / "a", 2)
    assert more.next_index == 3
