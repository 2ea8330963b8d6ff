"""Export a training checkpoint as a model to share: ``python -m crformer.export --checkpoint C --out DIR``.

DIR gets ``config.json`` + ``model.safetensors`` (and ``text_encoder/`` unless the text encoder is the
embedded MiniLM, frozen), which ``Segmenter.from_pretrained(DIR)`` loads with no pickle; the masks are
the checkpoint's. A non-empty DIR must be an earlier export, which is replaced (docs/DESIGN.md §9).
"""

from __future__ import annotations

from crformer.cli import parser, quiet_libraries
from crformer.files import check_writable
from crformer.process import run


def main(argv=None) -> None:
    p = parser("python -m crformer.export", __doc__)
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (best.pt, last.pt)")
    p.add_argument("--out", required=True, help="the folder to write")
    a = p.parse_args(argv)
    quiet_libraries()
    out = check_writable(a.out, "--out", folder=True)
    from crformer.pretrained import CONFIG_FILE, TEXT_ENCODER_DIR, WEIGHTS_FILE, check_target

    check_target(out)  # before the model loads: a wrong folder costs no time
    from crformer.api import Segmenter

    seg = Segmenter.from_checkpoint(a.checkpoint, device="cpu")
    seg.save_pretrained(out)
    extra = f" and {TEXT_ENCODER_DIR}/" if (out / TEXT_ENCODER_DIR).is_dir() else ""
    print(f"wrote {out}: {CONFIG_FILE}, {WEIGHTS_FILE}{extra}; load it with Segmenter.from_pretrained({str(out)!r})")


if __name__ == "__main__":
    run(main)
