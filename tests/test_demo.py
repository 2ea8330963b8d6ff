"""The demo's requests without a browser: every sentence gets ``Segmenter``'s mask, bad input is a message,
concurrent requests give the masks of one at a time, and the command line fails in one line.

The page itself, in a real browser: tests/test_demo_browser.py.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from crformer import Segmenter
from crformer.demo.segment import MAX_SENTENCE_CHARS, MAX_SENTENCES, SharedSegmenter, validation_scenes
from crformer.errors import UserError
from tests.helpers import png_header_only, python_m


@pytest.fixture(scope="module")
def seg(near_random_checkpoint):
    return Segmenter.from_checkpoint(near_random_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def scenes(seg):
    return validation_scenes(seg.cfg)


def test_scenes_are_the_validation_images_with_their_sentences(seg, scenes):
    from crformer.data import open_refer

    refer = open_refer(seg.cfg)
    samples = [s for split in seg.cfg["data"]["val_splits"] for s in refer.samples(split)]
    assert {sc.image_path for sc in scenes} == {s.image_path for s in samples}
    assert len({sc.label for sc in scenes}) == len(scenes)  # the list tells them apart
    for sc in scenes:
        assert set(sc.sentences) == {s.sentence for s in samples if s.image_path == sc.image_path}


def test_each_sentence_gets_segmenters_mask_and_its_time(seg, scenes):
    scene = scenes[0]
    picture, results = SharedSegmenter(seg).segment(scene.image_path, "\n".join(scene.sentences) + "\n\n")
    assert picture.size == Image.open(scene.image_path).size
    assert [r.sentence for r in results] == list(scene.sentences)
    for r in results:
        expected = seg(scene.image_path, r.sentence)
        np.testing.assert_array_equal(r.mask, expected)
        assert 0 < r.seconds < 60 and r.notes == ()
    # The check means something: this model's masks are neither empty nor full.
    assert 0 < results[0].mask.mean() < 1


def test_a_sentence_without_words_comes_back_with_the_tokenizers_note(seg, scenes):
    (result,) = SharedSegmenter(seg).segment(scenes[0].image_path, "?!")[1]
    assert any("no word tokens" in note for note in result.notes), result.notes


@pytest.mark.parametrize("image,text,needle", [
    (None, "the star", "no image"),
    ("scene", "", "no sentence"),
    ("scene", " \n\t\n", "no sentence"),
    ("scene", "\n".join(["the star"] * (MAX_SENTENCES + 1)), f"at most {MAX_SENTENCES}"),
    ("scene", "the " + "very " * MAX_SENTENCE_CHARS + "big star", f"at most {MAX_SENTENCE_CHARS}"),
    ("garbage", "the star", "cannot read image"),
    ("huge", "the star", "pixels"),
    ("missing", "the star", "not found"),
])
def test_bad_input_is_a_one_line_message(seg, scenes, tmp_path, image, text, needle):
    paths = {"scene": scenes[0].image_path, "garbage": tmp_path / "garbage.png", "huge": tmp_path / "huge.png",
             "missing": tmp_path / "missing.png", None: None}
    (tmp_path / "garbage.png").write_bytes(b"this is not an image")
    png_header_only(tmp_path / "huge.png", 20000, 20000)
    with pytest.raises(UserError, match=needle) as caught:
        SharedSegmenter(seg).segment(paths[image], text)
    assert "\n" not in str(caught.value)


def test_concurrent_requests_give_the_masks_of_one_at_a_time(seg, scenes):
    requests = [(sc.image_path, sentence) for sc in scenes[:4] for sentence in sc.sentences] * 2
    shared = SharedSegmenter(seg)
    alone = [shared.segment(path, sentence)[1][0].mask for path, sentence in requests]
    start = threading.Barrier(len(requests))

    def together(request):
        start.wait()  # all requests enter segment() at the same moment
        return shared.segment(*request)[1][0].mask

    with ThreadPoolExecutor(len(requests)) as pool:
        at_once = list(pool.map(together, requests))
    for a, b in zip(alone, at_once):
        np.testing.assert_array_equal(a, b)
    assert len({m.tobytes() for m in alone}) > 1  # different requests, different masks


def test_the_page_shows_overlay_and_mask_per_sentence_and_messages_not_tracebacks(seg, scenes, monkeypatch):
    pytest.importorskip("gradio", reason="the demo extra is not installed (scripts/setup-demo.sh)")
    from crformer.demo.page import segment_request
    from crformer.visualize import mask_picture, overlay

    shared = SharedSegmenter(seg)
    handle = segment_request(shared)
    scene = scenes[0]
    upload = {"path": scene.image_path, "orig_name": "my scene.png"}
    pictures, status = handle(upload, "\n".join(scene.sentences))
    assert len(pictures) == 2 * len(scene.sentences)
    for k, sentence in enumerate(scene.sentences):
        mask = seg(scene.image_path, sentence)
        (shown, caption), (mask_shown, mask_caption) = pictures[2 * k:2 * k + 2]
        assert caption.startswith(sentence) and caption.endswith(" ms") and mask_caption == f"{sentence} · mask"
        np.testing.assert_array_equal(np.asarray(shown), np.asarray(overlay(Image.open(scene.image_path), mask)))
        np.testing.assert_array_equal(np.asarray(mask_shown), np.asarray(mask_picture(mask)))
    assert f"{len(scene.sentences)} sentences on a" in status and "error" not in status

    pictures, status = handle(upload, "")
    assert pictures == [] and 'class="error"' in status and "no sentence" in status
    pictures, status = handle({"path": __file__, "orig_name": "notes <b>.png"}, "the star")
    assert "cannot read image notes &lt;b&gt;.png" in status and __file__ not in status  # the user's name, escaped

    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(shared, "segment", broken)
    pictures, status = handle(upload, "the star")
    assert pictures == [] and "internal error" in status and "RuntimeError" not in status


def test_a_save_pretrained_folder_serves_the_same_masks(seg, scenes, tmp_path):
    seg.save_pretrained(tmp_path / "shared")
    again = Segmenter.load(str(tmp_path / "shared"), "cpu")  # what the demo's --checkpoint goes through
    for sentence in scenes[0].sentences:
        np.testing.assert_array_equal(again(scenes[0].image_path, sentence), seg(scenes[0].image_path, sentence))


def test_the_command_serves_a_save_pretrained_folder_on_this_machine_only(seg, tmp_path, monkeypatch, capsys):
    """``--checkpoint FOLDER`` builds the page from a save_pretrained folder, and without ``--host`` the
    server is asked to listen on 127.0.0.1 (not every interface)."""
    pytest.importorskip("gradio", reason="the demo's extra (scripts/setup-demo.sh) is not installed")
    import crformer.demo.page as page
    from crformer.demo.__main__ import main

    seg.save_pretrained(tmp_path / "shared")
    served = {}
    monkeypatch.setattr(page, "serve", lambda built, scenes, host, port: served.update(host=host, port=port))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    main(["--checkpoint", str(tmp_path / "shared"), "--port", str(free), "--device", "cpu"])
    assert served == {"host": "127.0.0.1", "port": free}
    assert f"on http://127.0.0.1:{free}" in capsys.readouterr().out


def test_command_line_mistakes_are_one_line(tmp_path, near_random_checkpoint):
    has_gradio = importlib.util.find_spec("gradio") is not None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = str(probe.getsockname()[1])  # closed again: nobody listens on it
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        ckpt = str(near_random_checkpoint)
        cases = [
            (["--checkpoint", ckpt, "--port", "70000"], "not a port number"),
            (["--checkpoint", ckpt, "--port", busy], f"cannot listen on 127.0.0.1:{busy}"),
            (["--checkpoint", ckpt, "--host", "no-such-host.invalid", "--port", free], "--host no-such-host.invalid"),
            (["--checkpoint", str(tmp_path / "missing.pt"), "--port", free],
             "missing.pt" if has_gradio else "the demo needs gradio"),
        ]
        for args, needle in cases:
            proc = python_m("crformer.demo", *args)
            assert proc.returncode == 2, (args, proc.stderr[-2000:])
            assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
