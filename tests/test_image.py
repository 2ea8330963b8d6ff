import os

import numpy as np
import pytest
from PIL import Image

from crformer.data.image import load_image, to_rgb
from crformer.errors import UserError


def _rgb(img):
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    return np.asarray(img)


def test_rgb_roundtrip(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    p = tmp_path / "x.png"
    Image.fromarray(a).save(p)
    out = load_image(p)
    assert out.size == (9, 7)
    assert np.array_equal(_rgb(out), a)


@pytest.mark.parametrize("mode", ["L", "1", "P"])
def test_grayscale_and_palette(tmp_path, mode):
    g = np.tile(np.arange(0, 256, 32, dtype=np.uint8), (3, 1))  # 3x8
    im = Image.fromarray(g)
    if mode == "1":
        im = im.point(lambda v: 255 if v >= 128 else 0).convert("1")
        g = np.where(g >= 128, 255, 0).astype(np.uint8)
    elif mode == "P":
        im = im.convert("P")
    p = tmp_path / f"g_{mode}.png"
    im.save(p)
    with Image.open(p) as chk:
        assert chk.mode == mode
    a = _rgb(load_image(p))
    assert a.shape == (3, 8, 3)
    for c in range(3):
        assert np.array_equal(a[:, :, c], g)


def test_rgba_composited_over_black(tmp_path):
    a = np.zeros((2, 3, 4), dtype=np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = 200, 100, 50
    a[0, 0, 3] = 255  # opaque -> unchanged
    a[0, 1, 3] = 0  # transparent -> black even though RGB stores colour
    a[0, 2, 3] = 128  # half -> about half
    a[1, :, 3] = 255
    p = tmp_path / "rgba.png"
    Image.fromarray(a).save(p)
    out = _rgb(load_image(p))
    assert out[0, 0].tolist() == [200, 100, 50]
    assert out[0, 1].tolist() == [0, 0, 0]
    assert out[0, 2].tolist() == [100, 50, 25]
    assert out[1].tolist() == [[200, 100, 50]] * 3


def test_la_image(tmp_path):
    a = np.zeros((1, 2, 2), dtype=np.uint8)
    a[0, 0] = (100, 255)
    a[0, 1] = (100, 0)
    p = tmp_path / "la.png"
    Image.fromarray(a).save(p)
    out = _rgb(load_image(p))
    assert out[0, 0].tolist() == [100, 100, 100]
    assert out[0, 1].tolist() == [0, 0, 0]


def test_cmyk(tmp_path):
    im = Image.new("CMYK", (4, 3), (0, 255, 255, 0))  # pure red in CMYK
    p = tmp_path / "c.jpg"
    im.save(p, quality=100)
    with Image.open(p) as chk:
        assert chk.mode == "CMYK"
    out = _rgb(load_image(p))
    assert out.shape == (3, 4, 3)
    r, g, b = out[..., 0].mean(), out[..., 1].mean(), out[..., 2].mean()
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16bit_scaled_not_clipped(tmp_path, mode):
    v = np.array([[0, 1, 128, 255, 256, 1000, 32767, 32768, 40000, 65534, 65535]], dtype=np.uint16)
    if mode == "I":
        im = Image.fromarray(v.astype(np.int32))
    else:
        im = Image.fromarray(v)
        if mode == "I;16B":
            im = Image.frombytes("I;16B", im.size, v.astype(">u2").tobytes())
    assert im.mode == mode
    out = to_rgb(im)
    a = _rgb(out)[0, :, 0]
    assert a[0] == 0 and a[-1] == 255
    assert np.all(np.diff(a.astype(int)) >= 0)  # monotonic
    assert 120 <= a[7] <= 135  # mid value maps to mid grey, not 255 (clipping would give 255)
    assert a[3] <= 1  # 255/65535 is nearly black, not 255
    assert np.array_equal(_rgb(out)[..., 1], _rgb(out)[..., 2])
    # through a file as well (16-bit PNG)
    if mode == "I;16":
        p = tmp_path / "d16.png"
        im.save(p)
        b = _rgb(load_image(p))[0, :, 0]
        assert np.array_equal(b, a)


def test_float_image():
    im = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert _rgb(to_rgb(im))[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation(tmp_path):
    a = np.zeros((2, 4, 3), dtype=np.uint8)
    a[0, 0] = 255  # top-left marker
    im = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    p = tmp_path / "o.png"
    im.save(p, exif=exif)
    out = load_image(p)
    assert out.size == (2, 4)  # width/height swapped
    b = _rgb(out)
    assert b[0, 1].tolist() == [255, 255, 255]  # top-left moved to top-right
    assert b.sum() == 255 * 3


def test_missing_file(tmp_path):
    p = str(tmp_path / "nope.jpg")
    with pytest.raises(UserError) as ei:
        load_image(p)
    assert str(ei.value) == f"image not found: {p}"


def test_corrupt_file(tmp_path):
    p = tmp_path / "bad.jpg"
    p.write_bytes(b"this is not an image at all")
    with pytest.raises(UserError) as ei:
        load_image(p)
    assert str(p) in str(ei.value)
    # truncated PNG
    a = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    good = tmp_path / "good.png"
    Image.fromarray(a).save(good)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as ei:
        load_image(trunc)
    assert str(trunc) in str(ei.value)
    # directory
    with pytest.raises(UserError):
        load_image(tmp_path)


def test_file_is_closed(tmp_path):
    p = tmp_path / "x.png"
    Image.new("L", (3, 3), 7).save(p)
    out = load_image(p)
    os.remove(p)  # would fail on some platforms if still open; data must still be usable
    assert _rgb(out)[0, 0].tolist() == [7, 7, 7]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_inference_downscales_a_large_image_on_load(tmp_path, fmt):
    from crformer.data.image import INFERENCE_MAX_SIDE, image_size

    w, h = 2 * INFERENCE_MAX_SIDE + 200, 40
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (200, 30, 30)
    arr[:, w // 2:] = (30, 30, 200)
    p = str(tmp_path / f"wide.{fmt.lower()}")
    Image.fromarray(arr).save(p, format=fmt)
    assert load_image(p).size == image_size(p) == (w, h)  # training and evaluation keep every pixel
    small = load_image(p, max_side=INFERENCE_MAX_SIDE)
    assert small.mode == "RGB" and max(small.size) <= INFERENCE_MAX_SIDE
    assert max(small.size) >= INFERENCE_MAX_SIDE // 2  # JPEG's draft halves at most as far as fits
    assert abs(small.size[0] / small.size[1] - w / h) < 0.1 * w / h  # aspect kept
    got = np.asarray(small)
    left, right = got[:, : small.size[0] // 4].reshape(-1, 3).mean(0), got[:, -small.size[0] // 4:].reshape(-1, 3).mean(0)
    assert left[0] > 150 > left[2] and right[2] > 150 > right[0]  # the same picture, smaller
