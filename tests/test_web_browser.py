"""The web UI in a real browser: Debian's chromium, driven by Playwright.

Fills the training form for a tiny model on generated DEMs, watches the job page
reach done, exports the model with its button, uploads a TIFF and reads the
embedding on the page. Screenshots go to build/screenshots/.

Needs /usr/bin/chromium (Debian's ``chromium`` package; ``.ci/run`` installs
it). Nothing downloads a browser build.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from werkzeug.serving import make_server

from catchment_mae.preprocess import load_sample
from catchment_mae.runtime import create_session, read_metadata, spec_from_metadata
from catchment_mae.web.app import create_app
from tests.conftest import REPO

CHROMIUM = Path(os.environ.get("CMAE_CHROMIUM", "/usr/bin/chromium"))
SHOTS = REPO / "build" / "screenshots"
CHROMIUM_ARGS = [
    "--no-sandbox",  # as root
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]

if not CHROMIUM.exists() and not os.environ.get("CI"):
    pytest.skip(
        f"no browser at {CHROMIUM}: apt install chromium (CI installs it and runs "
        "these tests)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory, dem_dir):
    base = tmp_path_factory.mktemp("browser")
    data, models = base / "data", base / "models"
    shutil.copytree(dem_dir, data / "dems")
    models.mkdir()
    yield from _serve(data, models)


def _serve(data, models):
    """The web UI over ``data`` and ``models`` on a free port, for a fixture:
    (its URL, data, models) until the fixture ends."""
    app = create_app(data, models, allowed_hosts={"127.0.0.1", "localhost"})
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", data, models
    httpd.shutdown()


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        pg = browser.new_page(viewport={"width": 1100, "height": 1400})
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        yield pg
        browser.close()
        assert errors == [], errors  # no JavaScript error on any page


def _shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_browser__train_export_embed(server, page):
    url, data, models = server
    page.goto(url + "/")
    form = page.locator("#train-form")
    form.locator("[name=dataset]").fill("dems")
    form.locator("[name=name]").fill("browser_model")
    form.locator("[name=vit_model_name]").fill("vit_tiny_patch16_224")
    form.locator("[name=image_size]").fill("32")
    form.locator("[name=norm]").select_option("per-raster")
    form.locator("[name=max_epochs]").fill("3")
    form.locator("[name=batch_size]").fill("4")
    form.locator("summary").click()  # the small custom ViT
    for name, value in {
        "patch_size": "8", "embed_dim": "32", "depth": "1", "num_heads": "2",
        "decoder_dim": "32", "decoder_depth": "1", "decoder_num_heads": "2",
    }.items():  # fmt: skip
        form.locator(f"[name={name}]").fill(value)
    _shot(page, "1-train-form")
    form.locator("button[type=submit]").click()

    # The job page: live progress, then done with the loss curve drawn.
    page.wait_for_url("**/jobs/train-*")
    page.locator("#job-status", has_text="done").wait_for(timeout=120_000)
    progress = page.locator("#job-progress").inner_text()
    assert progress.startswith("epoch 3/3") and "images/s" in progress
    assert page.locator("#loss-curve").is_visible()
    result = json.loads(page.locator("#job-result").inner_text())
    assert result["weights"] == "browser_model.pth"
    _shot(page, "2-job-done")

    # Models: export with the button; the .onnx appears with a download link.
    page.goto(url + "/")
    page.locator("button.export[data-path='browser_model.pth']").click()
    page.locator("#models-message", has_text="exported browser_model.onnx").wait_for(
        timeout=120_000
    )
    link = page.locator("a[href*='browser_model.onnx']")
    link.wait_for()
    _shot(page, "3-exported")

    # Embed: upload a TIFF with the exported model; the page shows the JSON.
    tif = data / "dems" / "catchment_0004.tif"
    form = page.locator("#embed-form")
    form.locator("[name=model_path]").select_option("browser_model.onnx")
    form.locator("[name=image]").set_input_files(str(tif))
    form.locator("button[type=submit]").click()
    page.locator("#embed-result").wait_for(state="visible", timeout=60_000)
    shown = json.loads(page.locator("#embed-json").input_value())
    assert shown["status"] == "success" and shown["shape"] == [40]
    sess = create_session(models / "browser_model.onnx")
    s = load_sample(tif, spec_from_metadata(read_metadata(sess)))
    feed = {"image": s.image[None], "scale": s.scale[None], "valid": s.valid[None]}
    (ref,) = sess.run(["embedding"], feed)
    np.testing.assert_allclose(shown["embedding"], ref[0], atol=1e-5)
    assert page.locator("#embed-preview").evaluate("img => img.naturalWidth") >= 128
    _shot(page, "4-embedded")

    # A bad value is answered next to the form, naming the field.
    page.goto(url + "/")
    form = page.locator("#train-form")
    form.locator("[name=dataset]").fill("dems")
    form.locator("[name=name]").fill("bad")
    form.locator("[name=mask_ratio]").fill("1.5")
    form.locator("button[type=submit]").click()
    message = page.locator("#train-message.error")
    message.wait_for()
    assert "mask_ratio" in message.inner_text()
    assert form.locator("[name=mask_ratio]").get_attribute("aria-invalid") == "true"
    _shot(page, "5-bad-value")


@pytest.fixture(scope="module")
def zones_server(tmp_path_factory, mosaic_tiles, onnx_model):
    pytest.importorskip("pyogrio")
    from tests.conftest import write_zones, zone_polygons

    base = tmp_path_factory.mktemp("browser-zones")
    data, models = base / "data", base / "models"
    shutil.copytree(mosaic_tiles, data / "tiles")
    write_zones(data / "basins.gpkg", zone_polygons())
    models.mkdir()
    shutil.copy(onnx_model, models / "m.onnx")
    yield from _serve(data, models)


def test_browser__catchments_map(zones_server, page):
    """Embed a zones file from the page, click a catchment on the map: the
    others are coloured by similarity and the most similar are listed."""
    url, data, models = zones_server
    console: list[str] = []
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    page.goto(url + "/catchments")
    form = page.locator("#zones-form")
    form.locator("[name=zones]").fill("basins.gpkg")
    form.locator("[name=rasters]").fill("tiles")
    form.locator("[name=id]").fill("gauge")
    form.locator("[name=name]").fill("basins")
    page.locator("#zones-form [name=model_path] option").first.wait_for(
        state="attached"
    )
    form.locator("button[type=submit]").click()
    page.locator("#map-message", has_text="click one").wait_for(timeout=120_000)
    assert "4 embedded, 2 failed" in page.locator("#zones-message").inner_text()
    shapes = page.locator("#map path.leaflet-interactive")
    assert shapes.count() == 6  # failures drawn too (dashed)
    page.locator("#k").fill("2")
    shapes.nth(0).click()  # "inside", the first zone
    page.locator("#similar").wait_for(state="visible", timeout=30_000)
    assert page.locator("#similar-to").inner_text() == "inside"
    rows = page.locator("#similar-rows tr")
    assert rows.count() == 2
    sims = [float(rows.nth(i).locator("td").nth(2).inner_text()) for i in range(2)]
    assert sims == sorted(sims, reverse=True) and all(-1 <= s <= 1 for s in sims)
    fills = {shapes.nth(i).get_attribute("fill") for i in range(6)}
    assert len(fills) >= 4  # the clicked one, the ranked others, the failures
    href = page.locator("#similar-download").get_attribute("href")
    assert "format=csv" in href and "id=inside" in href
    _shot(page, "6-catchments")
    assert not [m for m in console if "Content Security Policy" in m], console
