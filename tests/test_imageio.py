"""Decoding of every kind of image file into uint8 RGB, and resizing."""

from __future__ import annotations

import io
import pickle

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data

from parsing.imageio import BadImageError, decode_rgb, is_image_file, resize_interpolation, resize_rgb


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    """The public-domain astronaut portrait, uint8 RGB [512, 512, 3], shrunk to 128 px."""
    image = skimage_data.astronaut()
    return cv2.resize(image, (128, 128), interpolation=cv2.INTER_AREA)


def channel_means(image: np.ndarray) -> np.ndarray:
    return image.reshape(-1, 3).mean(axis=0)


def test_astronaut_png_round_trip(tmp_path, astronaut):
    path = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(path)
    decoded = decode_rgb(path)
    assert decoded.dtype == np.uint8
    assert decoded.shape == (128, 128, 3)
    np.testing.assert_array_equal(decoded, astronaut)


def test_astronaut_channel_order(tmp_path, astronaut):
    # The portrait's channel means are about (142, 106, 96), so a swap of red and blue shows.
    means = channel_means(astronaut)
    assert means[0] > means[1] > means[2]
    path = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(path)
    decoded_means = channel_means(decode_rgb(path))
    np.testing.assert_allclose(decoded_means, means, atol=1e-9)


def test_astronaut_cmyk_jpeg(tmp_path, astronaut):
    path = tmp_path / "astronaut_cmyk.jpg"
    Image.fromarray(astronaut).convert("CMYK").save(path, "JPEG", quality=95)
    with Image.open(path) as check:
        assert check.mode == "CMYK"

    decoded = decode_rgb(path)
    assert decoded.shape == (128, 128, 3)
    np.testing.assert_allclose(channel_means(decoded), channel_means(astronaut), atol=2.0)
    error = np.abs(decoded.astype(np.int16) - astronaut.astype(np.int16))
    assert error.mean() < 4.0


def test_astronaut_jpeg_uppercase_extension(tmp_path, astronaut):
    path = tmp_path / "ASTRONAUT.JPG"
    Image.fromarray(astronaut).save(path, "JPEG", quality=95)
    decoded = decode_rgb(path)
    np.testing.assert_allclose(channel_means(decoded), channel_means(astronaut), atol=2.0)


@pytest.mark.parametrize("extension", [".bmp", ".tif", ".webp", ".jpeg"])
def test_other_formats_decode(tmp_path, astronaut, extension):
    path = tmp_path / f"image{extension}"
    assert cv2.imwrite(str(path), astronaut[:, :, ::-1])
    decoded = decode_rgb(path)
    np.testing.assert_allclose(channel_means(decoded), channel_means(astronaut), atol=3.0)


def test_png_named_jpg_decodes(tmp_path, astronaut):
    path = tmp_path / "really_a_png.jpg"
    Image.fromarray(astronaut).save(path, "PNG")
    np.testing.assert_array_equal(decode_rgb(path), astronaut)


def test_grayscale_png_three_channels(tmp_path):
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    path = tmp_path / "gray.png"
    Image.fromarray(gray, "L").save(path)
    decoded = decode_rgb(path)
    assert decoded.shape == (6, 8, 3)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[:, :, channel], gray)


def test_grayscale_jpeg(tmp_path, astronaut):
    gray = astronaut[:, :, 1]
    path = tmp_path / "gray.jpg"
    Image.fromarray(gray, "L").save(path, quality=95)
    decoded = decode_rgb(path)
    assert decoded.shape == (128, 128, 3)
    np.testing.assert_array_equal(decoded[:, :, 0], decoded[:, :, 2])
    assert abs(decoded[:, :, 0].mean() - gray.mean()) < 2.0


def test_palette_png(tmp_path, astronaut):
    palette_image = Image.fromarray(astronaut).convert("P")
    path = tmp_path / "palette.png"
    palette_image.save(path)
    expected = np.asarray(palette_image.convert("RGB"))
    np.testing.assert_array_equal(decode_rgb(path), expected)


def test_palette_png_transparency_over_black(tmp_path):
    indices = np.array([[0, 1], [1, 0]], dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette([250, 10, 20, 30, 200, 40] + [0] * (256 * 3 - 6))
    path = tmp_path / "palette_alpha.png"
    image.save(path, transparency=0)
    decoded = decode_rgb(path)
    np.testing.assert_array_equal(decoded[0, 0], [0, 0, 0])
    np.testing.assert_array_equal(decoded[0, 1], [30, 200, 40])


def test_rgba_png_composited_over_black(tmp_path):
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = [255, 255, 255, 0]  # hidden white under full transparency
    rgba[0, 1] = [200, 100, 50, 255]
    rgba[0, 2] = [200, 100, 50, 128]
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    decoded = decode_rgb(path)
    np.testing.assert_array_equal(decoded[0, 0], [0, 0, 0])
    np.testing.assert_array_equal(decoded[0, 1], [200, 100, 50])
    np.testing.assert_array_equal(decoded[0, 2], [100, 50, 25])


def test_gray_alpha_png(tmp_path):
    gray_alpha = np.array([[[100, 255], [100, 0]]], dtype=np.uint8)
    path = tmp_path / "gray_alpha.png"
    Image.fromarray(gray_alpha, "LA").save(path)
    decoded = decode_rgb(path)
    np.testing.assert_array_equal(decoded[0, 0], [100, 100, 100])
    np.testing.assert_array_equal(decoded[0, 1], [0, 0, 0])


def test_16bit_gray_png_rounded(tmp_path):
    values = np.array([[0, 65535, 257 * 100, 1000, 32768]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    assert cv2.imwrite(str(path), values)
    decoded = decode_rgb(path)
    # 1000 * 255 / 65535 = 3.89: rounding gives 4, taking the high byte would give 3.
    np.testing.assert_array_equal(decoded[0, :, 0], [0, 255, 100, 4, 128])


def test_16bit_rgb_png_channel_order(tmp_path):
    rgb16 = np.zeros((2, 2, 3), dtype=np.uint16)
    rgb16[..., 0] = 65535  # red
    rgb16[..., 2] = 257 * 10
    path = tmp_path / "rgb16.png"
    assert cv2.imwrite(str(path), rgb16[:, :, ::-1])  # OpenCV writes BGR
    decoded = decode_rgb(path)
    np.testing.assert_array_equal(decoded[0, 0], [255, 0, 10])


def test_exif_orientation_applied(tmp_path):
    image = np.zeros((10, 20, 3), dtype=np.uint8)
    image[:, :10] = [255, 0, 0]
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(image).save(path, exif=exif, quality=95)
    decoded = decode_rgb(path)
    assert decoded.shape == (20, 10, 3)
    assert decoded[:10, :, 0].mean() > 200  # the red left half is now on top


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_rejected(tmp_path, astronaut, fmt):
    buffer = io.BytesIO()
    Image.fromarray(astronaut).save(buffer, fmt)
    path = tmp_path / f"truncated.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[:-200])
    with pytest.raises(BadImageError, match="truncated") as caught:
        decode_rgb(path)
    assert caught.value.path == path
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    "content", [b"", b"this is not an image", b"\xff\xd8\xff\xe0garbage"], ids=["empty", "text", "bad-jpeg"]
)
def test_unreadable_file_rejected(tmp_path, content):
    path = tmp_path / "broken.jpg"
    path.write_bytes(content)
    with pytest.raises(BadImageError) as caught:
        decode_rgb(path)
    assert str(path) in str(caught.value)


def test_missing_file_rejected(tmp_path):
    with pytest.raises(BadImageError, match="cannot read"):
        decode_rgb(tmp_path / "absent.png")


def test_bad_image_error_pickles(tmp_path):
    error = BadImageError(tmp_path / "a.png", "the file is empty")
    restored = pickle.loads(pickle.dumps(error))
    assert restored.path == error.path
    assert restored.reason == error.reason
    assert str(restored) == str(error)


def test_is_image_file_any_case():
    assert is_image_file("a.JPG")
    assert is_image_file("a.Jpeg")
    assert is_image_file("dir/a.bmp")
    assert not is_image_file("Thumbs.db")
    assert not is_image_file("a.gif")


def test_resize_shrink_uses_area(astronaut):
    expected = cv2.resize(astronaut, (32, 32), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(resize_rgb(astronaut, 32), expected)
    assert resize_interpolation(128, 128, 32) == cv2.INTER_AREA


def test_resize_enlarge_uses_linear(astronaut):
    small = astronaut[:50, :40]
    expected = cv2.resize(small, (64, 64), interpolation=cv2.INTER_LINEAR)
    resized = resize_rgb(small, 64)
    assert resized.shape == (64, 64, 3)
    np.testing.assert_array_equal(resized, expected)
    assert resize_interpolation(100, 200, 150) == cv2.INTER_LINEAR


def test_resize_same_size_is_identity(astronaut):
    np.testing.assert_array_equal(resize_rgb(astronaut, 128), astronaut)
