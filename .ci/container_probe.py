"""HTTP and file helpers for .ci/container (standard library, plus Pillow/diffusers for `inputs`).

    python .ci/container_probe.py inputs DIR PHOTO        -> DIR/input.png, DIR/models/mine/
    python .ci/container_probe.py wait-ready URL PID SECONDS
    python .ci/container_probe.py get URL                  -> the body on stdout
    python .ci/container_probe.py roundtrip URL PNG OUT [MODEL] -> OUT (body), OUT.headers (JSON)
    python .ci/container_probe.py image-config IMAGE_INSPECT_JSON -> shell-quoted facts
    python .ci/container_probe.py same A B                 -> exit 1 unless two files are equal
    python .ci/container_probe.py pyc-check SITE_PACKAGES  -> exit 1 if .pyc files are stale

Every failure exits non-zero with a message on stderr.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def fail(message: str) -> None:
    print(f"container_probe: {message}", file=sys.stderr)
    raise SystemExit(1)


def http(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 60.0):
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def inputs(out: str, photo: str) -> None:
    """A 128x128 PNG crop of a real photograph and a tiny random (seeded) diffusers VAE folder."""
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    out_dir = Path(out)
    with Image.open(photo) as im:
        im = im.convert("RGB")
        side = min(im.size)
        im = im.crop((0, 0, side, side)).resize((128, 128), Image.Resampling.LANCZOS)
        im.save(out_dir / "input.png")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 16, 16], layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=64, scaling_factor=0.5,
    )
    vae.save_pretrained(out_dir / "models" / "mine")


def wait_ready(url: str, pid: str, seconds: str) -> None:
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            fail(f"process {pid} exited before {url}/readyz said ready")
        try:
            status, _, body = http(url + "/readyz", timeout=5)
            if status == 200:
                print(body.decode())
                return
        except OSError:
            pass
        time.sleep(0.5)
    fail(f"{url}/readyz not 200 within {seconds} s")


def get(url: str) -> None:
    status, _, body = http(url)
    if status != 200:
        fail(f"GET {url}: {status} {body[:500]!r}")
    sys.stdout.write(body.decode())


# What a roundtrip computed (X-Request-ID and timing differ between any two requests).
RESULT_HEADERS = {"x-model", "x-psnr", "x-ssim", "x-latent-shape", "x-original-size"}


def roundtrip(url: str, png: str, out: str, model: str | None = None) -> None:
    query = "?image_format=png" + (f"&model={model}" if model else "")
    status, headers, body = http(url + "/roundtrip" + query, Path(png).read_bytes(), {"Content-Type": "image/png"}, 300)
    if status != 200:
        fail(f"POST {url}/roundtrip{query}: {status} {body[:500]!r}")
    if not body.startswith(b"\x89PNG"):
        fail(f"POST {url}/roundtrip{query}: not a PNG ({headers.get('content-type')})")
    Path(out).write_bytes(body)
    keep = {k.lower(): v for k, v in headers.items() if k.lower() in RESULT_HEADERS}
    if set(keep) != RESULT_HEADERS:
        fail(f"POST {url}/roundtrip{query}: headers {sorted(headers)} lack some of {sorted(RESULT_HEADERS)}")
    Path(out + ".headers").write_text(json.dumps(keep, sort_keys=True) + "\n")


def image_config(path: str) -> None:
    """`buildah inspect --type image` JSON -> shell assignments of what the checks need."""
    doc = json.loads(Path(path).read_text())
    config = (doc.get("Docker") or {}).get("config") or {}
    health = config.get("Healthcheck") or {}
    test = health.get("Test") or []
    facts = {
        "IMG_USER": config.get("User") or "",
        "IMG_ENTRYPOINT": shlex.join(config.get("Entrypoint") or []),
        "IMG_CMD": shlex.join(config.get("Cmd") or []),
        "IMG_HEALTH_KIND": test[0] if test else "",
        "IMG_HEALTH_CMD": shlex.join(test[1:]),
        "IMG_HEALTH_TIMEOUT_S": str(int((health.get("Timeout") or 0) / 1e9)),
        "IMG_VOLUMES": " ".join(sorted(config.get("Volumes") or {})),
        "IMG_PORTS": " ".join(sorted(config.get("ExposedPorts") or {})),
        "IMG_WORKDIR": config.get("WorkingDir") or "",
    }
    for name, value in facts.items():
        print(f"{name}={shlex.quote(value)}")


def same(a: str, b: str) -> None:
    da, db = Path(a).read_bytes(), Path(b).read_bytes()
    if da != db:
        fail(f"{a} ({len(da)} bytes) and {b} ({len(db)} bytes) differ")


def pyc_check(site_packages: str) -> None:
    """Every .py with a cached .pyc has one Python will use: hash-based, or a timestamp one that
    matches the source's mtime and size. Stale ones would be recompiled at every start by a
    server that cannot write them (uid 10001, read-only venv)."""
    import struct

    total = stale = 0
    examples = []
    for pyc in Path(site_packages).rglob("__pycache__/*.pyc"):
        src = pyc.parent.parent / (pyc.name.split(".")[0] + ".py")
        if not src.is_file():
            continue
        total += 1
        header = pyc.read_bytes()[:16]
        flags = struct.unpack("<I", header[4:8])[0]
        if flags & 1:
            continue  # hash-based
        mtime, size = struct.unpack("<II", header[8:16])
        st = src.stat()
        if (mtime, size) != (int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF):
            stale += 1
            if len(examples) < 3:
                examples.append(str(src.relative_to(site_packages)))
    if total == 0:
        fail(f"no .pyc files under {site_packages}")
    if stale:
        fail(f"{stale} of {total} .pyc files are stale (e.g. {examples})")
    print(f"{total} .pyc files, none stale")


COMMANDS = {"inputs": inputs, "wait-ready": wait_ready, "get": get, "roundtrip": roundtrip,
            "image-config": image_config, "same": same, "pyc-check": pyc_check}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        fail(f"usage: {__doc__}")
    COMMANDS[sys.argv[1]](*sys.argv[2:])
