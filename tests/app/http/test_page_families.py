"""The explore page in a real headless Chromium with 16-channel models (FLUX's AutoencoderKL, TAEF1's
AutoencoderTiny): one canvas per latent channel, sizes and ratio from the shape, sampling works."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import gradient_image, live_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)"
)


@pytest.fixture
def server(family_dirs):
    from app.http.app import create_app
    from app.http.registry import ModelRegistry
    from app.http.settings import Settings
    from models.vae.inference import VAEModel

    registry = ModelRegistry([VAEModel.load(f, family_dirs[f]) for f in ("flux", "taef1")])
    with live_server(create_app(Settings(warmup=False), registry)) as url:
        yield url


def test_page_draws_16_channels(server, tmp_path):
    from playwright.sync_api import sync_playwright

    image = tmp_path / "a.png"
    gradient_image(64, 48).save(image)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            problems = []
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.goto(server + "/")
            page.wait_for_function("document.getElementById('model').options.length === 2")
            info = page.inner_text("#model-info")
            assert "AutoencoderKL · 16 latent channels" in info and "shift 0.1159" in info
            page.set_input_files("#file", str(image))
            page.wait_for_function("document.body.dataset.recon === 'done'", timeout=120_000)
            assert page.get_attribute("#status", "class") != "error", page.inner_text("#status")
            channels = page.eval_on_selector_all("#channels canvas", "cs => cs.map(c => [c.width, c.height])")
            assert channels == [[8, 6]] * 16
            assert page.inner_text("#latent-size") == "8×6×16"
            assert "12.0× fewer values" in page.inner_text("#ratio")  # 3 * 8 * 8 / 16

            page.evaluate("delete document.body.dataset.recon")
            page.select_option("#model", "taef1")
            page.wait_for_function("document.body.dataset.recon === 'done'", timeout=120_000)
            assert "AutoencoderTiny · 16 latent channels" in page.inner_text("#model-info")
            assert page.eval_on_selector_all("#channels canvas", "cs => cs.length") == 16

            page.select_option("#sample-size", "64")
            page.click("#sample")
            page.wait_for_function("document.getElementById('samples').naturalWidth > 0", timeout=120_000)
            assert page.evaluate("document.getElementById('samples').naturalHeight") == 64
            assert problems == []
        finally:
            browser.close()
