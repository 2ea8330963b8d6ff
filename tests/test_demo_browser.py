"""The demo page in a real browser: ``python -m crformer.demo`` serves it, Debian's chromium (driven by
Playwright, never a downloaded browser) loads it, submits sentences on a synthetic scene and reads the
masks the page shows; they must equal ``Segmenter``'s on the same input, when several pages ask at once
too. Bad input shows its message on the page, and the page goes on serving.

Skips, with the reason, where gradio, Playwright or chromium is missing; .ci/run installs all three.
``CRFORMER_DEMO_CHECKPOINT=runs/default/best.pt CRFORMER_DEMO_SCREENSHOT=docs/demo.png`` runs it on a
trained model and writes the README's screenshot (by default: a tiny near-random model, no screenshot).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from crformer import Segmenter
from crformer.demo.segment import validation_scenes
from tests.helpers import REPO

pytest.importorskip("gradio", reason="the demo extra is not installed (scripts/setup-demo.sh)")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (scripts/setup-demo.sh)")
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("no chromium on this machine (apt-get install chromium; .ci/run installs it)", allow_module_level=True)
from crformer.demo.page import MAX_UPLOAD_MB  # noqa: E402 - needs gradio

#: Chromium headless, offline and quiet: no sandbox (root in CI), no GPU, nothing fetched in the background.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: Seconds to wait for what the page shows after a click (a tiny model answers in well under one).
WAIT_S = 60


@pytest.fixture(scope="module")
def checkpoint(near_random_checkpoint):
    return os.environ.get("CRFORMER_DEMO_CHECKPOINT") or str(near_random_checkpoint)


@pytest.fixture(scope="module")
def seg(checkpoint):
    return Segmenter.from_checkpoint(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def scenes(seg):
    return validation_scenes(seg.cfg)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """The README's command, on a free port; its URL. The server computes with as many threads as this
    process, so that its floating-point sums are the ones ``seg`` makes here; gradio keeps its files in
    a folder of the test's."""
    import torch

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONWARNINGS="ignore",
               GRADIO_TEMP_DIR=str(tmp_path_factory.mktemp("gradio")))
    proc = subprocess.Popen([sys.executable, "-m", "crformer.demo", "--checkpoint", checkpoint, "--port", str(port),
                             "--device", "cpu"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the demo exited with status {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the demo did not answer within 300 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log = proc.stdout.read()
    assert "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def new_page(browser, server):
    """Pages on the demo, closed after the test; each one fails the test on a request that leaves this
    machine (the page must work offline)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    outside = []
    context.on("request", lambda r: None if r.url.startswith(("http://127.0.0.1", "data:", "blob:"))
               else outside.append(r.url))

    def open_page():
        page = context.new_page()
        page.set_default_timeout(WAIT_S * 1000)
        page.goto(server)
        page.locator("#segment").wait_for()
        return page

    yield open_page
    context.close()
    assert not outside, outside


def pick_scene(page, scene) -> None:
    """Pick ``scene`` in the list and wait until the page shows its sentences."""
    page.locator("#scene input").click()
    page.get_by_role("option", name=scene.label, exact=True).click()
    sync_api.expect(page.locator("#sentences textarea")).to_have_value("\n".join(scene.sentences))


def submit(page, sentences: list[str]) -> None:
    page.locator("#sentences textarea").fill("\n".join(sentences))
    page.locator("#segment").click()


def shown_masks(page, sentences: list[str]) -> list[np.ndarray]:
    """Wait for one mask per sentence in the page's gallery; the masks as the browser got them."""
    masks = []
    for sentence in sentences:
        img = page.locator(f'#masks img[alt="{sentence} · mask"]')
        img.wait_for()
        png = page.request.get(img.get_attribute("src")).body()
        masks.append(np.asarray(Image.open(io.BytesIO(png))) > 127)
    return masks


def status(page, needle: str) -> str:
    """Wait until the status area says ``needle``; its text."""
    page.locator("#status", has_text=needle).wait_for()
    return page.locator("#status").inner_text()


def test_a_scenes_sentences_give_segmenters_masks(new_page, scenes, seg):
    page = new_page()
    scene = scenes[0]
    pick_scene(page, scene)
    page.locator("#segment").click()
    for sentence, mask in zip(scene.sentences, shown_masks(page, scene.sentences)):
        np.testing.assert_array_equal(mask, seg(scene.image_path, sentence))
    width, height = Image.open(scene.image_path).size
    assert f"on a {width}×{height} image" in status(page, " ms on cpu")
    if os.environ.get("CRFORMER_DEMO_SCREENSHOT"):
        page.wait_for_load_state("networkidle")
        page.screenshot(path=os.environ["CRFORMER_DEMO_SCREENSHOT"], full_page=True)


def test_pages_asking_at_once_get_the_masks_of_one_at_a_time(new_page, scenes, seg):
    asks = [(scene, scene.sentences[-1]) for scene in scenes[1:4]]
    pages = [new_page() for _ in asks]
    for page, (scene, sentence) in zip(pages, asks):
        pick_scene(page, scene)
        page.locator("#sentences textarea").fill(sentence)
    for page in pages:  # every click before any answer is read
        page.locator("#segment").click()
    for page, (scene, sentence) in zip(pages, asks):
        (mask,) = shown_masks(page, [sentence])
        np.testing.assert_array_equal(mask, seg(scene.image_path, sentence))


def test_bad_input_shows_its_message_and_the_page_keeps_serving(new_page, scenes, seg, tmp_path):
    page = new_page()
    page.locator("#segment").click()
    status(page, "no image: pick a scene or upload an image")

    first, second = scenes[:2]
    pick_scene(page, first)
    submit(page, [])
    status(page, "no sentence")
    submit(page, first.sentences[:1])
    shown_masks(page, first.sentences[:1])

    (tmp_path / "holiday.png").write_bytes(b"not a picture at all")
    page.locator("#image input[type=file]").set_input_files(tmp_path / "holiday.png")
    submit(page, ["the star"])
    message = status(page, "cannot read image holiday.png")
    assert str(tmp_path) not in message and "/gradio" not in message and "Traceback" not in page.content()
    assert page.locator("#masks img").count() == 0  # no masks of the last image next to the message

    with open(tmp_path / "poster.png", "wb") as big:
        big.truncate(MAX_UPLOAD_MB * 2**20 + 1)  # sparse: no disk written
    page.locator("#image input[type=file]").set_input_files(tmp_path / "poster.png")
    page.get_by_text(f"exceed the maximum allowed size of {MAX_UPLOAD_MB}").wait_for()  # gradio's, at upload

    pick_scene(page, second)  # the same page and server go on answering
    submit(page, second.sentences[:1])
    (mask,) = shown_masks(page, second.sentences[:1])
    np.testing.assert_array_equal(mask, seg(second.image_path, second.sentences[0]))
