"""The explore page in a real headless Chromium (Debian's `chromium`, driven by Playwright; no browser download).

A real server on loopback with two tiny models; the page uploads a (shrunk) Kodak image, and the test
checks what a person would look at: PSNR shown, reconstruction drawn and equal to /roundtrip's
pixels, one canvas per latent channel, an interpolation whose first frame is the reconstruction.
Screenshots land in the test's tmp_path and in out/screenshots/ at the repository root.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from support import ROOT, make_tiny_vae
from support import live_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SIZE = (192, 128)  # the photos are about 3:2; small keeps the tiny model and the canvases quick

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)"
)


@pytest.fixture
def server(tiny_vae_dir, tmp_path):
    from app.http.app import create_app
    from app.http.registry import ModelRegistry
    from app.http.settings import Settings
    from models.vae.inference import VAEModel

    other = tmp_path / "tiny-b"
    make_tiny_vae(seed=1).save_pretrained(other)
    registry = ModelRegistry([VAEModel.load("tiny", tiny_vae_dir), VAEModel.load("tiny-b", other)])
    with live_server(create_app(Settings(warmup=False), registry)) as url:
        yield url


def _photo(photos_dir: Path, name: str, dest: Path) -> Path:
    path = dest / f"{name}.png"
    Image.open(photos_dir / name).convert("RGB").resize(SIZE, Image.LANCZOS).save(path)
    return path


def _canvas(page, canvas_id: str) -> np.ndarray:
    """(H, W, 4) uint8 pixels of a canvas, read back inside the page."""
    w, h, data = page.evaluate(
        """id => { const c = document.getElementById(id);
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                   return [c.width, c.height, Array.from(d)]; }""",
        canvas_id,
    )
    return np.array(data, dtype=np.uint8).reshape(h, w, 4)


def _shot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    keep = ROOT / "out" / "screenshots"
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, keep / name)


def _assert_same_up_to_rounding(a: np.ndarray, b: np.ndarray) -> None:
    """The same decoded pixels up to float rounding: the page's requests run at once, so each model
    call gets part of the CPU threads, and frames are decoded in a batch while /roundtrip decodes one
    image; another summation order may move a few pixels by a level (CI runs under load failed
    exact comparisons). A canvas colour conversion or scaling would move most pixels, by more."""
    moved = np.abs(a.astype(int) - b.astype(int))
    assert moved.max() <= 1 and (moved > 0).mean() < 0.01, (moved.max(), (moved > 0).mean())


def test_explore_page(server, photos_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    image_a, image_b = _photo(photos_dir, "coffee.png", tmp_path), _photo(photos_dir, "rocket.jpg", tmp_path)
    expected = requests.post(f"{server}/roundtrip", data=image_a.read_bytes(), timeout=60)
    assert expected.status_code == 200
    expected_pixels = np.asarray(Image.open(io.BytesIO(expected.content)).convert("RGB"))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            problems = []
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", lambda msg: msg.type == "error" and problems.append(f"console: {msg.text}"))
            page.goto(server + "/")
            page.wait_for_function("document.getElementById('model').options.length === 2")
            assert page.input_value("#model") == "tiny"  # the registry's default
            assert "4 latent channels" in page.inner_text("#model-info")

            # The optional API key is kept in localStorage and sent as a Bearer token.
            with page.expect_request(lambda r: "/v1/models" in r.url) as listed:
                page.fill("#api-key", "secret-key")
                page.dispatch_event("#api-key", "change")
            assert listed.value.headers.get("authorization") == "Bearer secret-key"
            assert page.evaluate("localStorage.getItem('vae.apiKey')") == "secret-key"

            page.set_input_files("#file", str(image_a))
            page.wait_for_function("document.body.dataset.recon === 'done'", timeout=60_000)
            assert page.get_attribute("#status", "class") != "error", page.inner_text("#status")
            psnr = float(page.inner_text("#psnr"))
            assert psnr == pytest.approx(float(expected.headers["X-PSNR"]), abs=0.01)
            assert 0 < float(page.inner_text("#ssim")) <= 1

            recon = _canvas(page, "recon")
            assert recon.shape == (SIZE[1], SIZE[0], 4)
            assert (recon[..., 3] == 255).all() and recon[..., :3].std() > 5, "reconstruction canvas is blank"
            # What /roundtrip returned, pixel for pixel up to float rounding (_assert_same_up_to_rounding).
            _assert_same_up_to_rounding(recon[..., :3], expected_pixels)
            diff = _canvas(page, "diff")
            assert diff.shape == recon.shape and diff[..., :3].std() > 1, "difference heatmap is blank"

            latent_w, latent_h = SIZE[0] // 8, SIZE[1] // 8
            channels = page.eval_on_selector_all("#channels canvas", "cs => cs.map(c => [c.width, c.height])")
            assert channels == [[latent_w, latent_h]] * 4
            assert page.inner_text("#latent-size") == f"{latent_w}×{latent_h}×4"
            assert "48.0× fewer values" in page.inner_text("#ratio")  # 3 * 8 * 8 / 4
            _shot(page, tmp_path, "explore-reconstruction.png")

            page.set_input_files("#file-b", str(image_b))
            page.fill("#steps", "5")
            page.click("#interpolate")
            page.wait_for_function("document.body.dataset.interpolation === 'done'", timeout=60_000)
            assert page.get_attribute("#t", "max") == "4"
            first = _canvas(page, "frame")
            _assert_same_up_to_rounding(first, recon)  # slerp at t=0 is the reconstruction of image A
            page.evaluate("() => { const t = document.getElementById('t'); t.value = 4; t.dispatchEvent(new Event('input')); }")
            assert page.inner_text("#t-value") == "1.00"
            last = _canvas(page, "frame")
            assert last.shape == first.shape and np.abs(last.astype(int) - first.astype(int)).mean() > 5
            page.evaluate("() => { const t = document.getElementById('t'); t.value = 2; t.dispatchEvent(new Event('input')); }")

            page.select_option("#sample-size", "64")
            page.click("#sample")
            page.wait_for_function("document.getElementById('samples').naturalWidth > 0", timeout=60_000)
            assert page.evaluate("document.getElementById('samples').naturalWidth") == 4 * 64  # n=4 side by side
            _shot(page, tmp_path, "explore-interpolation.png")  # slider at t=0.5, samples below

            # Another model: the page re-runs the reconstruction with it.
            page.evaluate("delete document.body.dataset.recon")
            page.select_option("#model", "tiny-b")
            page.wait_for_function("document.body.dataset.recon === 'done'", timeout=60_000)
            assert not np.array_equal(_canvas(page, "recon"), recon)

            # The colour-lock box re-runs the reconstruction with ?colour_lock=1 (roundtrip and encode).
            locked = requests.post(f"{server}/roundtrip", params={"model": "tiny-b", "colour_lock": 1},
                                   data=image_a.read_bytes(), timeout=60)
            assert locked.status_code == 200
            page.evaluate("delete document.body.dataset.recon")
            with page.expect_request(lambda r: "/roundtrip" in r.url and "colour_lock=1" in r.url):
                page.check("#colour-lock")
            page.wait_for_function("document.body.dataset.recon === 'done'", timeout=60_000)
            _assert_same_up_to_rounding(_canvas(page, "recon")[..., :3],
                                        np.asarray(Image.open(io.BytesIO(locked.content)).convert("RGB")))
            assert float(page.inner_text("#psnr")) == pytest.approx(float(locked.headers["X-PSNR"]), abs=0.01)
            assert problems == []
        finally:
            browser.close()


def test_api_docs_render_offline(server):
    """/docs (Swagger UI) and /redoc load their scripts and styles from this server: requests
    anywhere else are refused by the browser here, as on a machine without internet, and the pages
    still render. (ReDoc's bundle asks for one decorative image, its "by Redocly" footer logo, from
    its CDN; that image is the only outside request allowed to fail.)"""
    from playwright.sync_api import sync_playwright

    elsewhere = []

    def only_this_server(route):
        if route.request.url.startswith(server):
            return route.continue_()
        if route.request.resource_type != "image":
            elsewhere.append(route.request.url)
        return route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            # Swagger UI's bundle is 1.5 MB of JavaScript: on a 2-core machine shared with other
            # work, parsing it took over 30 s once. A bound, generous enough not to measure load.
            page.set_default_timeout(120_000)
            page.route("**/*", only_this_server)
            page.goto(server + "/docs")
            page.wait_for_selector(".swagger-ui .opblock-summary-path")
            paths = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.textContent)")
            assert {"/encode", "/decode", "/roundtrip", "/sample", "/interpolate"} <= {s.strip() for s in paths}
            _shot(page, Path(ROOT / "out"), "docs-swagger.png")
            page.goto(server + "/redoc")
            page.wait_for_function("document.body.innerText.includes('/interpolate')")
            _shot(page, Path(ROOT / "out"), "docs-redoc.png")
        finally:
            browser.close()
    assert elsewhere == [], elsewhere
