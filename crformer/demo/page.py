"""The demo's web page (gradio): pick a synthetic validation scene or upload an image, type one or more
sentences, and see each sentence's overlay and mask side by side with the time the model took. Every bad
input is a message on the page, never a traceback, and the server keeps serving.
"""

from __future__ import annotations

import html
import os
import sys
import traceback
import uuid
from pathlib import Path

from PIL import Image

# Before gradio is imported (it reads this then, and again at launch): no usage reports, no version check.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
import gradio as gr  # noqa: E402

from crformer.demo.segment import Scene, SentenceMask, SharedSegmenter  # noqa: E402
from crformer.errors import UserError  # noqa: E402
from crformer.visualize import mask_picture, overlay  # noqa: E402

#: The largest upload gradio accepts, in MiB; the page refuses a bigger file with a message before it is
#: sent. Pixel limits are the image loader's (crformer.data.image).
MAX_UPLOAD_MB = 50
#: Requests served at once. The model itself runs one sentence at a time (SharedSegmenter); the others
#: meanwhile decode their image or encode their pictures.
CONCURRENT_REQUESTS = 4
#: The scenes are 64-pixel images: shown enlarged to the box (gradio shows an image at its own size when it
#: fits), with pixels as sharp squares rather than a blur, so that a mask's outline can be judged. The
#: results grow with the number of sentences instead of scrolling inside a box of fixed height.
CSS = """
#image img { width: 100%; height: 100%; object-fit: contain; }
#masks .grid-wrap { height: auto; max-height: none; }
.pixelated img { image-rendering: pixelated; }
#status .error { color: #c0392b; font-weight: 600; }
"""


def status_html(message: str, error: bool = False) -> str:
    """One line for the status area; escaped, since it may quote a file name or a sentence."""
    return f'<p class="{"error" if error else "info"}">{html.escape(message)}</p>'


def summary(picture: Image.Image, results: list[SentenceMask], device) -> str:
    """What the status area says after a request: the image size, the total time, the tokenizer's notes."""
    total_ms = 1000 * sum(r.seconds for r in results)
    lines = [f"{len(results)} sentence{'s' * (len(results) != 1)} on a {picture.width}×{picture.height} image: "
             f"{total_ms:.0f} ms on {device}"]
    lines += [f"note on {r.sentence!r}: {note}" for r in results for note in r.notes]
    return "".join(status_html(line) for line in lines)


def pick_scene(scenes: list[Scene]):
    """The scene list's handler: show the picked scene and put its own sentences in the text box. The
    scene goes out as its file, which gradio copies into its cache once (the event can fire twice per pick;
    a picture handed over in memory would be written again while the page is loading it)."""

    def pick(index: int | None, shown: int | None):
        # The second firing of one pick changes nothing: it would overwrite sentences typed meanwhile.
        if index is None or index == shown:
            return gr.skip(), gr.skip(), gr.skip()
        scene = scenes[int(index)]
        return scene.image_path, "\n".join(scene.sentences), index

    return pick


def labelled(picture: Image.Image, **text: str) -> Image.Image:
    """``picture`` with PNG text entries. A downloaded picture says what it answers; and as gradio names a
    cached picture by its bytes and writes it again whenever the same bytes come back, a request id keeps
    a repeated request (a double click) from rewriting a file that the page is still loading."""
    picture.info.update(text)
    return picture


def segment_request(shared: SharedSegmenter):
    """The Segment button's handler. It gets the image component's raw value (the event runs with
    ``preprocess=False``): gradio would decode an upload itself, and fail with its own error on a file
    that is not an image or has too many pixels; our loader gives the message instead."""

    def segment(image: dict | None, text: str | None):
        path = (image or {}).get("path")
        try:
            picture, results = shared.segment(path, text)
        except UserError as e:
            # Name the file the user chose, not the server's copy of it.
            message = str(e).replace(path, image.get("orig_name") or "the image") if path else str(e)
            return [], status_html(message, error=True)
        except Exception:  # noqa: BLE001 - a bug costs this request, not the page or the server
            traceback.print_exc(file=sys.stderr)
            return [], status_html("internal error: the request failed (the server's log has the details)",
                                   error=True)
        request = uuid.uuid4().hex
        pictures = []
        for r in results:
            png_text = {"Description": r.sentence, "crformer-demo-request": request}
            caption = f"{r.sentence} · {1000 * r.seconds:.0f} ms"
            pictures.append((labelled(overlay(picture, r.mask), **png_text), caption))
            pictures.append((labelled(mask_picture(r.mask), **png_text), f"{r.sentence} · mask"))
        return pictures, summary(picture, results, shared.segmenter.device)

    return segment


def build_page(shared: SharedSegmenter, scenes: list[Scene], checkpoint: str) -> gr.Blocks:
    """The page: inputs on the left, per sentence an overlay and a mask on the right."""
    # delete_cache: every request leaves pictures in gradio's cache; a demo left running must not fill
    # the disk (files older than an hour, checked hourly).
    with gr.Blocks(title="CRFormer demo", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown(f"### CRFormer: which object does the sentence pick?\n`{checkpoint}` on "
                    f"{shared.segmenter.device}. Pick a synthetic validation scene or upload an image, type one "
                    "sentence per line (change one word to see what it does), then **Segment**.")
        with gr.Row():
            with gr.Column(scale=1):
                scene = gr.Dropdown([(s.label, i) for i, s in enumerate(scenes)], value=None,
                                    label="Synthetic validation scene", elem_id="scene")
                image = gr.Image(type="filepath", sources=["upload"], format="png", height=320,
                                 label="Image (or drop your own)", elem_id="image", elem_classes="pixelated")
                text = gr.Textbox(lines=4, label="Sentences, one per line", elem_id="sentences",
                                  placeholder="the red square\nthe blue square")
                button = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column(scale=2):
                status = gr.HTML(elem_id="status")
                gallery = gr.Gallery(label="Per sentence: overlay | mask (the model's time)", columns=2,
                                     format="png", object_fit="contain", interactive=False,
                                     elem_id="masks", elem_classes="pixelated")
        shown = gr.State(None)  # the scene last put on the page (per browser session)
        scene.input(pick_scene(scenes), [scene, shown], [image, text, shown])
        button.click(segment_request(shared), [image, text], [gallery, status], preprocess=False,
                     concurrency_limit=CONCURRENT_REQUESTS)
    return page


def serve(page: gr.Blocks, scenes: list[Scene], host: str, port: int) -> None:
    """Serve ``page`` on ``host``:``port`` until Ctrl-C; local only: no share link, no server-side rendering
    (it would start Node), nothing fetched from outside (the default theme's fonts ship with gradio). The
    scenes' folders are allowed so that a picked scene can go out as its own file."""
    scene_folders = sorted({str(Path(scene.image_path).parent) for scene in scenes})
    page.launch(server_name=host, server_port=port, share=False, ssr_mode=False, quiet=True, show_error=False,
                max_file_size=f"{MAX_UPLOAD_MB}mb", allowed_paths=scene_folders, css=CSS)
