"""Draw a face from FaceParams into an RGB image and a 19-class label map.

Every part is one or more polygons in the face frame (see ``faces.py``). The
canvas maps them to pixels once and fills the same polygon into the image
(anti-aliased) and into the label map (hard edges, the class id), so the map
follows the drawn geometry exactly up to the one-pixel anti-aliased rim. Later
parts cover earlier ones in both arrays, which gives each pixel one class.
Details that carry no class of their own (iris, nostrils, teeth, wrinkles) are
drawn into the image only and clipped to the pixels of the part they sit on.
"""

from __future__ import annotations

import cv2
import numpy as np

from parsing.labels import FACE_PARTS_19
from parsing.synthetic.faces import FaceParams

PART = {name: index for index, name in enumerate(FACE_PARTS_19)}
_SHIFT = 4  # fractional bits for cv2 drawing, so vertices keep 1/16-pixel precision


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 40) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _band(xs: np.ndarray, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """Return the polygon between two curves sampled at the same x positions."""
    return np.concatenate([np.stack([xs, top], 1), np.stack([xs[::-1], bottom[::-1]], 1)])


def _scaled(rgb, factor: float) -> tuple:
    return tuple(float(np.clip(c * factor, 0, 255)) for c in rgb)


class FaceCanvas:
    """An RGB image and a label map of the same size, drawn through one face-frame transform."""

    def __init__(self, params: FaceParams, size: int):
        self.size = size
        self.image = np.zeros((size, size, 3), dtype=np.uint8)  # RGB
        self.labels = np.zeros((size, size), dtype=np.uint8)  # FACE_PARTS_19 ids
        angle = np.deg2rad(params.roll_deg)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        self._linear = params.scale * size * rotation  # [2, 2]: face units -> pixels
        self._offset = np.array([params.center_x * size, params.center_y * size])
        self.pixels_per_unit = params.scale * size

    def _fixed(self, polygons: list[np.ndarray]) -> list[np.ndarray]:
        pixels = [poly @ self._linear.T + self._offset for poly in polygons]
        return [np.round(p * (1 << _SHIFT)).astype(np.int32) for p in pixels]

    def fill(self, polygons: list[np.ndarray], rgb, label: int) -> None:
        """Fill polygons (holes allowed: a contour inside another one) into image and map."""
        fixed = self._fixed(polygons)
        cv2.fillPoly(self.image, fixed, tuple(float(c) for c in rgb), lineType=cv2.LINE_AA, shift=_SHIFT)
        cv2.fillPoly(self.labels, fixed, int(label), lineType=cv2.LINE_8, shift=_SHIFT)

    def fill_within(self, polygons: list[np.ndarray], rgb, within: tuple[int, ...], alpha: float = 1.0) -> None:
        """Fill polygons into the image only, on pixels whose class is in ``within``."""
        fixed = self._fixed(polygons)
        window = self._window(fixed, margin=1)
        if window is None:
            return
        layer, local = self._layer(window, fixed)
        cv2.fillPoly(layer, local, tuple(float(c) for c in rgb), lineType=cv2.LINE_AA, shift=_SHIFT)
        self._blend(window, layer, within, alpha)

    def line_within(self, points: np.ndarray, rgb, width: float, within: tuple[int, ...], alpha: float = 1.0) -> None:
        """Draw an open polyline of ``width`` face units into the image only, clipped like fill_within."""
        thickness = max(1, int(round(width * self.pixels_per_unit)))
        fixed = self._fixed([points])
        window = self._window(fixed, margin=thickness + 1)
        if window is None:
            return
        layer, local = self._layer(window, fixed)
        cv2.polylines(layer, local, False, tuple(float(c) for c in rgb), thickness, lineType=cv2.LINE_AA, shift=_SHIFT)
        self._blend(window, layer, within, alpha)

    def _window(self, fixed: list[np.ndarray], margin: int) -> tuple[int, int, int, int] | None:
        """Return the pixel box (x0, y0, x1, y1) around fixed-point polygons, or None when off the image.

        Drawing details into this box instead of the whole image keeps a face at
        256 px fast, because most details cover a few hundred pixels.
        """
        points = np.concatenate(fixed)
        low = np.floor(points.min(axis=0) / (1 << _SHIFT)).astype(int) - margin - 1
        high = np.ceil(points.max(axis=0) / (1 << _SHIFT)).astype(int) + margin + 2
        x0, y0 = max(int(low[0]), 0), max(int(low[1]), 0)
        x1, y1 = min(int(high[0]), self.size), min(int(high[1]), self.size)
        if x0 >= x1 or y0 >= y1:
            return None
        return x0, y0, x1, y1

    def _layer(self, window, fixed: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Copy the image inside ``window`` and move the polygons into its coordinates."""
        x0, y0, x1, y1 = window
        offset = np.array([x0, y0], dtype=np.int32) << _SHIFT
        return self.image[y0:y1, x0:x1].copy(), [poly - offset for poly in fixed]

    def _blend(self, window, layer: np.ndarray, within: tuple[int, ...], alpha: float) -> None:
        x0, y0, x1, y1 = window
        image = self.image[y0:y1, x0:x1]  # a view, so writes land in self.image
        region = np.isin(self.labels[y0:y1, x0:x1], within)
        mixed = alpha * layer[region].astype(np.float32) + (1 - alpha) * image[region].astype(np.float32)
        image[region] = np.round(mixed).astype(np.uint8)


def render_face(params: FaceParams, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render one face.

    Returns the RGB image, uint8 [size, size, 3], and the label map, uint8
    [size, size] with FACE_PARTS_19 ids. ``rng`` only draws the pixel noise.
    """
    if size < 16:
        raise ValueError(f"image size {size} is too small to draw a face; use at least 16 pixels")
    canvas = FaceCanvas(params, size)
    _draw_background(canvas, params)
    ears_under_hair = params.hair_style == "long" and params.fringe > 0.3
    if ears_under_hair:
        _draw_ears(canvas, params)
    _draw_back_hair(canvas, params)
    _draw_neck_and_clothes(canvas, params)
    if not ears_under_hair:
        _draw_ears(canvas, params)
    _draw_face(canvas, params)
    if params.earrings:
        _draw_earrings(canvas, params)
    _draw_nose(canvas, params)
    _draw_eyes(canvas, params)
    _draw_brows(canvas, params)
    _draw_mouth(canvas, params)
    _draw_fringe(canvas, params)
    if params.glasses:
        _draw_glasses(canvas, params)
    if params.hat:
        _draw_hat(canvas, params)
    image = _apply_camera(canvas.image, params, rng)
    return image, canvas.labels


def _draw_background(canvas: FaceCanvas, p: FaceParams) -> None:
    size = canvas.size
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)[None, :, None]  # [1, W, 1]
    colour = np.array(p.background_rgb, np.float32) + ramp * np.array(p.background_gradient, np.float32)
    canvas.image[:] = np.clip(np.broadcast_to(colour, (size, size, 3)), 0, 255).astype(np.uint8)
    for kind, geometry, rgb in p.clutter:
        colour = tuple(float(c) for c in rgb)
        g = [v * size for v in geometry]
        if kind == "rect":
            corners = np.array([[g[0], g[1]], [g[0] + g[2], g[1]], [g[0] + g[2], g[1] + g[3]], [g[0], g[1] + g[3]]])
            cv2.fillPoly(canvas.image, [np.round(corners * 16).astype(np.int32)], colour, cv2.LINE_AA, shift=_SHIFT)
        elif kind == "circle":
            center = (int(round(g[0] * 16)), int(round(g[1] * 16)))
            cv2.circle(canvas.image, center, int(round(g[2] * 16)), colour, -1, cv2.LINE_AA, shift=_SHIFT)
        else:
            start = (int(round(g[0] * 16)), int(round(g[1] * 16)))
            end = (int(round(g[2] * 16)), int(round(g[3] * 16)))
            cv2.line(canvas.image, start, end, colour, max(1, int(round(g[4]))), cv2.LINE_AA, shift=_SHIFT)


def _face_outline(p: FaceParams) -> np.ndarray:
    """Return the face oval; the chin narrows the lower half and drops with an open jaw."""
    outline = _ellipse(0.0, 0.0, 1.0, p.face_height, n=64)
    lower = outline[:, 1] > 0
    depth = outline[lower, 1] / p.face_height  # 0 at the cheeks, 1 at the chin
    outline[lower, 0] *= 1.0 - p.chin * depth**2
    outline[lower, 1] *= 1.0 + 0.45 * p.mouth_open / p.face_height
    return outline


def _draw_face(canvas: FaceCanvas, p: FaceParams) -> None:
    canvas.fill([_face_outline(p)], p.skin_rgb, PART["skin"])
    # Cheeks: a faint warm tint that gives the flat oval some depth.
    blush = _scaled(p.skin_rgb, 0.92)
    cheeks = [_ellipse(side * 0.55 + p.yaw * 0.1, 0.28, 0.22, 0.14) for side in (-1, 1)]
    canvas.fill_within(cheeks, (blush[0], blush[1] * 0.9, blush[2] * 0.9), (PART["skin"],), alpha=0.5)


def _draw_ears(canvas: FaceCanvas, p: FaceParams) -> None:
    # The ear on the side the head turns towards narrows behind the cheek.
    for side, label in ((1, PART["l_ear"]), (-1, PART["r_ear"])):
        width = 0.14 * float(np.clip(1.0 - 2.5 * side * p.yaw, 0.3, 1.6))
        center_x = side * (0.98 + width * 0.3)
        canvas.fill([_ellipse(center_x, 0.05, width, 0.24)], _scaled(p.skin_rgb, 0.95), label)
        canvas.fill_within([_ellipse(center_x, 0.05, width * 0.5, 0.15)], _scaled(p.skin_rgb, 0.78), (label,), 0.6)


def _draw_earrings(canvas: FaceCanvas, p: FaceParams) -> None:
    for side in (-1, 1):
        width = 0.14 * float(np.clip(1.0 - 2.5 * side * p.yaw, 0.3, 1.6))
        x = side * (0.98 + width * 0.3)
        outer = _ellipse(x, 0.36, 0.055, 0.065, n=24)
        inner = _ellipse(x, 0.36, 0.028, 0.035, n=24)
        canvas.fill([outer, inner], p.earring_rgb, PART["ear_r"])


def _draw_back_hair(canvas: FaceCanvas, p: FaceParams) -> None:
    top = -0.12
    if p.hair_style == "bald":
        # Only a low band of hair around the back of the head.
        t = np.linspace(np.pi * 0.95, np.pi * 2.05, 40)
        outer = np.stack([1.07 * np.cos(t), top + 1.3 * np.sin(t)], 1)
        band = np.concatenate([outer[outer[:, 1] > -0.7], [[1.0, 0.1], [-1.0, 0.1]]])
        canvas.fill([band], p.hair_rgb, PART["hair"])
        return
    if p.hair_style == "long":
        t = np.linspace(np.pi, 2 * np.pi, 32)
        cap = np.stack([1.2 * np.cos(t), top + 1.45 * np.sin(t)], 1)
        sides = np.array([[1.28, 0.6], [1.22, 1.9], [-1.22, 1.9], [-1.28, 0.6]])
        canvas.fill([np.concatenate([cap, sides])], p.hair_rgb, PART["hair"])
        return
    if p.hair_style == "curly":
        t = np.linspace(np.pi * 0.9, np.pi * 2.1, 11)
        blobs = [_ellipse(1.05 * np.cos(a), top + 1.35 * np.sin(a), 0.32, 0.32, n=24) for a in t]
        for blob in blobs:
            canvas.fill([blob], p.hair_rgb, PART["hair"])
        canvas.fill([_ellipse(0.0, top - 0.2, 1.1, 1.25)], p.hair_rgb, PART["hair"])
        return
    t = np.linspace(np.pi * 0.95, np.pi * 2.05, 40)
    cap = np.stack([1.1 * np.cos(t), top + 1.42 * np.sin(t)], 1)
    canvas.fill([cap], p.hair_rgb, PART["hair"])
    if p.hair_style == "bun":
        canvas.fill([_ellipse(0.0, top - 1.5, 0.38, 0.3)], p.hair_rgb, PART["hair"])


def _draw_fringe(canvas: FaceCanvas, p: FaceParams) -> None:
    """Cover the upper forehead with hair; bald heads have none."""
    if p.hair_style == "bald":
        return
    lowest = -p.face_height + 0.3 + 0.6 * p.fringe  # lower edge of the fringe at the centre
    xs = np.linspace(-1.08, 1.08, 25)
    part_side = 0.3 if p.fringe > 0.3 else -0.3
    lower_edge = lowest - 0.12 * (xs - part_side) ** 2 + 0.03 * np.sin(xs * 9)
    lower_edge = np.where(np.abs(xs) > 0.9, -0.25, lower_edge)  # hair down the temples
    # The upper edge follows the skull so the fringe never squares off the head.
    upper_edge = -0.12 - 1.42 * np.sqrt(np.clip(1 - (xs / 1.12) ** 2, 0.0, 1.0))
    upper_edge = np.minimum(upper_edge, lower_edge - 0.05)
    canvas.fill([_band(xs, upper_edge, lower_edge)], p.hair_rgb, PART["hair"])
    # A few darker strands so the hair has texture.
    for x in np.linspace(-0.8, 0.8, 6):
        strand = np.array([[x * 0.8, -p.face_height], [x, lowest - 0.1 * x**2]])
        canvas.line_within(strand, _scaled(p.hair_rgb, 0.6), 0.025, (PART["hair"],), 0.6)


def _draw_neck_and_clothes(canvas: FaceCanvas, p: FaceParams) -> None:
    neck = np.array([[-0.42, 0.5], [0.42, 0.5], [0.46, 2.4], [-0.46, 2.4]])
    canvas.fill([neck], _scaled(p.skin_rgb, 0.85), PART["neck"])
    xs = np.linspace(-0.6, 0.6, 13)
    collar = np.stack([xs, 1.5 + p.neckline * (1 - (xs / 0.6) ** 2)], 1)
    shoulders = np.array([[1.0, 1.6], [2.2, 1.9], [2.7, 2.5], [2.9, 6.0], [-2.9, 6.0], [-2.7, 2.5], [-2.2, 1.9], [-1.0, 1.6]])
    canvas.fill([np.concatenate([collar, shoulders])], p.cloth_rgb, PART["cloth"])
    if p.necklace:
        t = np.linspace(-1.0, 1.0, 21)
        centre = np.stack([0.44 * t, 1.15 + (0.35 + 0.5 * p.neckline) * (1 - t**2)], 1)
        chain = _band(centre[:, 0], centre[:, 1] - 0.025, centre[:, 1] + 0.025)
        canvas.fill([chain], p.necklace_rgb, PART["neck_l"])
        canvas.fill([_ellipse(0.0, centre[10, 1] + 0.06, 0.05, 0.06, n=20)], p.necklace_rgb, PART["neck_l"])


def _draw_eyes(canvas: FaceCanvas, p: FaceParams) -> None:
    t = np.linspace(-1.0, 1.0, 21)
    shift = p.yaw * 0.12
    for side, label in ((1, PART["l_eye"]), (-1, PART["r_eye"])):
        cx = side * p.eye_dx + shift
        upper_height = 0.09 * p.eye_open
        lower_height = 0.065 * p.eye_open * (1.0 - 0.7 * p.lower_lid)
        xs = cx + p.eye_width * t
        # The upper lid peaks nearer the nose, as in real eyes.
        peak = (1 - t**2) ** 0.7 * (1 - 0.15 * side * t)
        upper = p.eye_y - upper_height * peak
        lower = p.eye_y + lower_height * (1 - t**2) ** 0.8
        canvas.fill([_band(xs, upper, lower)], (238, 236, 230), label)
        gaze = cx + p.yaw * 0.05
        canvas.fill_within([_ellipse(gaze, p.eye_y, 0.07, 0.07, n=24)], p.iris_rgb, (label,))
        canvas.fill_within([_ellipse(gaze, p.eye_y, 0.032, 0.032, n=16)], (10, 10, 10), (label,))
        lash = np.stack([xs, upper + 0.008], 1)
        canvas.line_within(lash, (25, 20, 20), 0.03, (label,))


def _draw_brows(canvas: FaceCanvas, p: FaceParams) -> None:
    colour = tuple(0.5 * c + 0.5 * d for c, d in zip(p.hair_rgb, (40, 30, 25)))
    t = np.linspace(0.0, 1.0, 15)  # 0 at the inner end, 1 at the outer end
    shift = p.yaw * 0.12
    base = p.eye_y - p.brow_gap - p.brow_raise
    for side, label in ((1, PART["l_brow"]), (-1, PART["r_brow"])):
        inner_x = side * (p.eye_dx - 0.9 * p.eye_width) + shift
        outer_x = side * (p.eye_dx + 1.25 * p.eye_width) + shift
        xs = inner_x + (outer_x - inner_x) * t
        centre = base - p.brow_arch * np.sin(np.pi * t) - p.brow_inner * (1 - t) + 0.03 * t
        half = 0.5 * p.brow_thickness * (1 - 0.45 * t)
        polygon = np.concatenate([np.stack([xs, centre - half], 1), np.stack([xs[::-1], (centre + half)[::-1]], 1)])
        canvas.fill([polygon], colour, label)


def _draw_nose(canvas: FaceCanvas, p: FaceParams) -> None:
    x0 = p.yaw * 0.2
    top = p.eye_y + 0.02
    tip = top + p.nose_length
    w = p.nose_width
    right = np.array([[0.055, top], [0.07, top + 0.5 * p.nose_length], [w, tip - 0.03], [0.8 * w, tip + 0.045], [0.0, tip + 0.06]])
    left = right[::-1] * np.array([-1.0, 1.0])
    outline = np.concatenate([right, left[1:]]) + np.array([x0, 0.0])
    nose_label = (PART["nose"],)
    canvas.fill([outline], _scaled(p.skin_rgb, 0.94), PART["nose"])
    shade_side = 1.0 if np.cos(p.light_angle) < 0 else -1.0
    shadow = np.array([[0.06 * shade_side, top + 0.05], [0.08 * shade_side, tip - 0.08], [0.9 * w * shade_side, tip]]) + [x0, 0]
    canvas.line_within(shadow, _scaled(p.skin_rgb, 0.75), 0.03, nose_label, 0.6)
    for side in (-1, 1):
        nostril = _ellipse(x0 + side * 0.065, tip + 0.015, 0.035, 0.017, n=16)
        canvas.fill_within([nostril], _scaled(p.skin_rgb, 0.4), nose_label)
    if p.nose_wrinkle > 0.2:
        # Horizontal creases across the bridge and "bunny lines" beside it.
        strength = min(1.0, p.nose_wrinkle)
        for k in range(3):
            y = top + 0.07 + 0.05 * k
            crease = np.array([[x0 - 0.06, y + 0.01], [x0, y - 0.008], [x0 + 0.06, y + 0.01]])
            canvas.line_within(crease, _scaled(p.skin_rgb, 0.55), 0.018, nose_label, strength)
        for side in (-1, 1):
            bunny = np.array([[x0 + side * 0.09, top + 0.05], [x0 + side * 0.17, top + 0.16]])
            canvas.line_within(bunny, _scaled(p.skin_rgb, 0.6), 0.018, (PART["skin"],), 0.8 * strength)


def _mouth_curves(p: FaceParams) -> dict[str, np.ndarray]:
    """Return x positions and the four lip curves of the mouth (y values, face units)."""
    t = np.linspace(-1.0, 1.0, 25)
    xs = p.yaw * 0.12 + p.mouth_width * t
    middle = p.mouth_y - p.mouth_corner * t**2
    exponent = float(np.clip(0.5 * (1.0 - 0.6 * p.mouth_box), 0.15, 1.0))
    profile = (1 - t**2) ** exponent
    raise_profile = p.upper_lip_raise * (0.6 + 0.4 * p.asymmetry * t) * np.sqrt(1 - t**2)
    inner_upper = middle - 0.35 * p.mouth_open * profile - raise_profile
    inner_lower = middle + 0.65 * p.mouth_open * profile
    press = 1.0 - p.lip_press
    cupid_bow = 1.0 - 0.3 * np.exp(-((t / 0.15) ** 2))
    outer_upper = inner_upper - p.upper_lip * press * (1 - t**2) ** 0.4 * cupid_bow
    outer_lower = inner_lower + (p.lower_lip * press + p.lower_lip_pout) * (1 - t**2) ** 0.5
    return {
        "x": xs, "middle": middle, "inner_upper": inner_upper, "inner_lower": inner_lower,
        "outer_upper": outer_upper, "outer_lower": outer_lower,
    }


def _draw_mouth(canvas: FaceCanvas, p: FaceParams) -> None:
    c = _mouth_curves(p)
    xs = c["x"]
    if p.mouth_corner > 0.05 or p.upper_lip_raise > 0.03:
        # Nasolabial folds deepen when the lip corners or the upper lip are pulled up.
        depth = min(1.0, max(p.mouth_corner, p.upper_lip_raise) * 6)
        for side in (-1, 1):
            fold = np.array([[side * (p.nose_width + 0.04), p.eye_y + p.nose_length],
                             [side * (p.mouth_width + 0.06), p.mouth_y - 0.06],
                             [side * (p.mouth_width + 0.03), p.mouth_y + 0.05]]) + [p.yaw * 0.12, 0]
            canvas.line_within(fold, _scaled(p.skin_rgb, 0.7), 0.02, (PART["skin"],), 0.6 * depth)
    gap = c["inner_lower"] - c["inner_upper"]
    if gap.max() > 0.004:
        canvas.fill([_band(xs, c["inner_upper"], c["inner_lower"])], (70, 20, 28), PART["mouth"])
        if p.teeth > 0.5:
            teeth_lower = c["inner_upper"] + np.minimum(gap * 0.7, 0.05)
            canvas.fill_within([_band(xs, c["inner_upper"] - 0.01, teeth_lower)], (240, 238, 225), (PART["mouth"],))
    canvas.fill([_band(xs, c["outer_upper"], c["inner_upper"])], _scaled(p.lip_rgb, 0.92), PART["u_lip"])
    canvas.fill([_band(xs, c["inner_lower"], c["outer_lower"])], p.lip_rgb, PART["l_lip"])
    if gap.max() <= 0.004:
        line = np.stack([xs, c["middle"]], 1)
        canvas.line_within(line, _scaled(p.lip_rgb, 0.55), 0.015, (PART["u_lip"], PART["l_lip"]))


def _draw_glasses(canvas: FaceCanvas, p: FaceParams) -> None:
    shift = p.yaw * 0.12
    rims = []
    for side in (-1, 1):
        cx = side * p.eye_dx + shift
        if p.glasses_square:
            outer = np.array([[cx - 0.25, p.eye_y - 0.15], [cx + 0.25, p.eye_y - 0.15], [cx + 0.23, p.eye_y + 0.15], [cx - 0.23, p.eye_y + 0.15]])
            inner = np.array([[cx - 0.21, p.eye_y - 0.115], [cx + 0.21, p.eye_y - 0.115], [cx + 0.195, p.eye_y + 0.115], [cx - 0.195, p.eye_y + 0.115]])
        else:
            outer = _ellipse(cx, p.eye_y, 0.25, 0.17)
            inner = _ellipse(cx, p.eye_y, 0.21, 0.135)
        rims.append((outer, inner))
    lens_region = (PART["skin"], PART["l_eye"], PART["r_eye"], PART["l_brow"], PART["r_brow"], PART["nose"])
    canvas.fill_within([inner for _, inner in rims], (200, 220, 235), lens_region, alpha=0.15)
    for outer, inner in rims:
        canvas.fill([outer, inner], p.glasses_rgb, PART["eye_g"])
    inner_edge = p.eye_dx - 0.25
    bridge = np.array([[-inner_edge, p.eye_y - 0.05], [inner_edge, p.eye_y - 0.05], [inner_edge, p.eye_y - 0.02], [-inner_edge, p.eye_y - 0.02]])
    canvas.fill([bridge + [shift, 0]], p.glasses_rgb, PART["eye_g"])
    for side in (-1, 1):
        x0 = side * (p.eye_dx + 0.24) + shift
        arm = np.array([[x0, p.eye_y - 0.06], [side * 1.0, p.eye_y - 0.03], [side * 1.0, p.eye_y], [x0, p.eye_y - 0.03]])
        canvas.fill([arm], p.glasses_rgb, PART["eye_g"])


def _draw_hat(canvas: FaceCanvas, p: FaceParams) -> None:
    brim_y = -p.face_height + 0.3
    t = np.linspace(np.pi, 2 * np.pi, 24)
    crown = np.concatenate([np.stack([1.02 * np.cos(t), brim_y - 0.05 + 1.1 * np.sin(t)], 1), [[1.02, brim_y], [-1.02, brim_y]]])
    canvas.fill([crown], p.hat_rgb, PART["hat"])
    canvas.fill([_ellipse(0.0, brim_y, 1.4, 0.12)], _scaled(p.hat_rgb, 0.8), PART["hat"])


def _apply_camera(image: np.ndarray, p: FaceParams, rng: np.random.Generator) -> np.ndarray:
    """Apply lighting, blur, sensor noise and JPEG compression; the label map is unaffected."""
    size = image.shape[0]
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    direction = np.array([np.cos(p.light_angle), np.sin(p.light_angle)], np.float32)
    ramp = direction[0] * coords[None, :] + direction[1] * coords[:, None]  # [H, W], -0.7..0.7
    gain = p.brightness * (1.0 + p.light_strength * ramp)
    out = image.astype(np.float32) * gain[:, :, None]
    if p.blur_sigma > 0.3:
        out = cv2.GaussianBlur(out, (0, 0), p.blur_sigma)
    if p.noise_sd > 0:
        out += rng.normal(0.0, p.noise_sd, out.shape).astype(np.float32)
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    if p.jpeg_quality:
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(out, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, p.jpeg_quality])
        if not ok:
            raise RuntimeError(f"OpenCV failed to JPEG-encode a {size}x{size} image at quality {p.jpeg_quality}")
        out = cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return out
