"""A local web page to look at masks: ``python -m crformer.demo --checkpoint runs/default/best.pt``.

Pick one of the synthetic validation scenes or upload an image, type one or more sentences (one per
line) and see each sentence's overlay and mask side by side, with the time the model took. Needs the
demo extra: ``pip install 'crformer[demo]'`` (in this checkout: ``scripts/setup-demo.sh``). The page
listens on 127.0.0.1 only, unless ``--host`` says otherwise.
"""

from __future__ import annotations

import importlib.util
import socket

from crformer.cli import parser, quiet_libraries
from crformer.errors import UserError
from crformer.process import run

INSTALL_HINT = "pip install 'crformer[demo]' (in this checkout: scripts/setup-demo.sh)"


def check_port_free(host: str, port: int) -> None:
    """UserError unless ``host``:``port`` can be listened on, found before the model loads."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port} is not a port number (1-65535)")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except socket.gaierror as e:
        raise UserError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror} (--port N for another port)") from None


def main(argv=None) -> None:
    p = parser("python -m crformer.demo", __doc__)
    p.add_argument("--checkpoint", required=True, help="a .pt checkpoint, or a folder written by save_pretrained")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config changes that keep the model (as predict's), e.g. data.synthetic.eval_samples=600")
    a = p.parse_args(argv)
    check_port_free(a.host, a.port)
    if importlib.util.find_spec("gradio") is None:
        raise UserError(f"the demo needs gradio: {INSTALL_HINT}")
    quiet_libraries()
    from crformer.demo.page import build_page, serve
    from crformer.demo.segment import SharedSegmenter, validation_scenes

    from crformer.api import Segmenter

    seg = Segmenter.load(a.checkpoint, a.device, a.overrides)
    scenes = validation_scenes(seg.cfg)
    page = build_page(SharedSegmenter(seg), scenes, a.checkpoint)
    print(f"serving {a.checkpoint} on http://{a.host}:{a.port} ({len(scenes)} scenes; Ctrl-C stops)", flush=True)
    serve(page, scenes, a.host, a.port)


if __name__ == "__main__":
    run(main)
