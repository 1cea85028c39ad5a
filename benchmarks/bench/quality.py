"""Quality sections: bf16 against fp32 on Kodak, tiled against untiled, a large image's peak RSS."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.bench.inputs import ModelSpec, png_bytes, photo, to_tensor
from benchmarks.bench.machine import rss_now_mib, rss_peak_mib
from benchmarks.bench.systems import Server




def kodak_quality(model: ModelSpec, kodak: Path, limit: int | None) -> dict:
    """Mean PSNR / SSIM of fp32 and bf16 (fast path) roundtrips against the originals."""
    from PIL import Image

    from models.vae import imaging
    from models.vae.inference import VAEModel
    from models.metrics import psnr, ssim

    files = sorted(kodak.glob("*.png"))[:limit]
    m32 = VAEModel.load(model.name, model.path, dtype="float32")
    mbf = VAEModel.load(model.name, model.path, dtype="bfloat16")
    res = {"images": len(files), "psnr_fp32": [], "psnr_bf16": [], "ssim_fp32": [], "ssim_bf16": [], "psnr_bf16_vs_fp32": []}
    for f in files:
        ref = np.asarray(Image.open(f).convert("RGB"))
        x = to_tensor(ref)
        outs = {}
        for tag, m in (("fp32", m32), ("bf16", mbf)):
            outs[tag] = imaging.to_uint8(m.decode(m.encode(x), tuple(x.shape[-2:])))[0].numpy()
            res[f"psnr_{tag}"].append(psnr(ref, outs[tag]))
            res[f"ssim_{tag}"].append(ssim(ref, outs[tag]))
        res["psnr_bf16_vs_fp32"].append(min(psnr(outs["fp32"], outs["bf16"]), 100.0))
    summary = {k: (float(np.mean(v)) if isinstance(v, list) else v) for k, v in res.items()}
    summary["psnr_loss_db"] = summary["psnr_fp32"] - summary["psnr_bf16"]
    return summary


def tiling_check(model: ModelSpec, size: int, tile_size: int, out: Path, dtype: str = "float32") -> dict:
    """Tiled against untiled roundtrip at size x size: PSNR of each against the input, sample images."""
    from PIL import Image

    from models.vae import imaging
    from models.vae.inference import VAEModel
    from models.metrics import psnr

    m = VAEModel.load(model.name, model.path, dtype=dtype, tile_size=tile_size)
    ref = photo(size, seed=3)
    x = to_tensor(ref)
    untiled = imaging.to_uint8(m.decode(m.encode(x, tiled=False), tiled=False))[0].numpy()
    tiled = imaging.to_uint8(m.decode(m.encode(x, tiled=True), tiled=True))[0].numpy()
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(tiled).save(out / f"tiling_{model.name}_{size}_tiled.png")
    Image.fromarray(untiled).save(out / f"tiling_{model.name}_{size}_untiled.png")
    diff = np.clip(np.abs(tiled.astype(np.int16) - untiled.astype(np.int16)) * 8, 0, 255).astype(np.uint8)
    Image.fromarray(diff).save(out / f"tiling_{model.name}_{size}_diff_x8.png")
    p_un, p_t = psnr(ref, untiled), psnr(ref, tiled)
    return {"model": model.name, "size": size, "tile_size": tile_size, "tile_overlap": m.tile_overlap, "dtype": dtype,
            "psnr_untiled": p_un, "psnr_tiled": p_t, "psnr_difference_db": abs(p_un - p_t),
            "psnr_tiled_vs_untiled": psnr(untiled, tiled),
            "images": [f"tiling_{model.name}_{size}_{k}.png" for k in ("tiled", "untiled", "diff_x8")]}


def large_check(model: ModelSpec, size: int, rss_cap_gib: float, log, untiled: bool = True,
                dtype: str = "float32", tiled: bool = True) -> dict:
    """One size x size /roundtrip through a server (default mode, automatic tiling), then through
    a server with tiling off; peak RSS of each server process (killed past rss_cap_gib)."""
    png = png_bytes(photo(size, seed=5))
    res = {"model": model.name, "size": size, "png_bytes": len(png), "dtype": dtype}
    variants = ([("tiled", [])] if tiled else []) + ([("untiled", ["--tile-threshold-pixels", "0"])] if untiled else [])
    for tag, extra in variants:
        server = Server(model, "--dtype", dtype, *extra, max_pixels=size * size)
        stop = threading.Event()
        killed = {"flag": False}

        def watch():
            while not stop.wait(0.2):
                with contextlib.suppress(OSError):
                    if rss_now_mib(server.pid()) > rss_cap_gib * 1024:
                        killed["flag"] = True
                        server.proc.kill()
                        return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t = time.perf_counter()
        try:
            r = server.call("roundtrip", png, None)
            entry = {"ok": True, "seconds": round(time.perf_counter() - t, 2), "psnr": float(r.headers["X-PSNR"])}
        except Exception as exc:
            entry = {"ok": False, "seconds": round(time.perf_counter() - t, 2),
                     "error": f"killed above the {rss_cap_gib} GiB cap" if killed["flag"] else str(exc)[:200]}
        stop.set()
        with contextlib.suppress(OSError):
            entry["peak_rss_mib"] = round(rss_peak_mib(server.pid()), 1)
        if killed["flag"]:
            entry["peak_rss_mib"] = f">{rss_cap_gib * 1024:.0f}"
        server.close()
        res[tag] = entry
        log(f"[{model.name}] {size}x{size} /roundtrip {tag}: {entry}")
    return res
