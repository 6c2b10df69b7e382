"""Random face parameters: expression geometry and nuisance variation.

Geometry lives in a face-centred frame whose unit is the half-width of the face
oval: x grows towards the image's right (the subject's left), y grows downwards,
and the face oval is centred on the origin. ``render.py`` maps this frame onto
pixels with one similarity transform per image, so every part lands in the
image and in the label map at the same place.

Each expression is a set of offsets from the neutral face, modelled on the
facial action units that define it. For example, happy lifts the lip corners
and the cheeks push up the lower eyelids, while surprise raises the brows,
widens the eyes and drops the jaw. A random
intensity scales the offsets and every parameter gets individual noise, so weak
expressions overlap with neutral and neighbouring classes (fear and surprise,
angry and disgust, sad and neutral) overlap with each other.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import numpy as np

from parsing.labels import EXPRESSIONS

# Offsets from the neutral face at full intensity, in face units, except eye_open,
# a dimensionless factor on the eyelid heights. Keys are FaceParams fields. Omitted keys stay neutral.
EXPRESSION_OFFSETS: dict[str, dict[str, float]] = {
    "angry": {
        "brow_raise": -0.10, "brow_inner": -0.15, "eye_open": -0.4,
        "mouth_corner": -0.03, "mouth_width": -0.06, "lip_press": 0.5,
        "nose_wrinkle": 0.25,
    },
    "disgust": {
        "brow_raise": -0.06, "brow_inner": -0.06, "eye_open": -0.3, "lower_lid": 0.3,
        "nose_wrinkle": 1.0, "upper_lip_raise": 0.09, "mouth_corner": -0.07,
        "mouth_open": 0.03,
    },
    "fear": {
        "brow_raise": 0.11, "brow_inner": 0.12, "eye_open": 0.6, "mouth_open": 0.13,
        "mouth_width": 0.08, "mouth_corner": -0.05, "mouth_box": 0.8, "teeth": 0.7,
    },
    "happy": {
        "mouth_corner": 0.16, "mouth_width": 0.08, "mouth_open": 0.09, "lower_lid": 0.35,
        "eye_open": -0.25, "teeth": 1.0,
    },
    "sad": {
        "brow_inner": 0.15, "eye_open": -0.3, "mouth_corner": -0.14, "lower_lip_pout": 0.03,
    },
    "surprise": {
        "brow_raise": 0.17, "brow_inner": 0.03, "eye_open": 0.7, "mouth_open": 0.32,
        "mouth_width": -0.08, "mouth_box": -0.5, "teeth": 0.3,
    },
    "neutral": {},
}

# Standard deviation of individual variation for each expression parameter, in
# the same units. These are what make neighbouring classes overlap.
EXPRESSION_NOISE: dict[str, float] = {
    "brow_raise": 0.03, "brow_inner": 0.035, "eye_open": 0.13, "lower_lid": 0.1,
    "nose_wrinkle": 0.2, "upper_lip_raise": 0.02, "mouth_corner": 0.035,
    "mouth_open": 0.03, "mouth_width": 0.03, "mouth_box": 0.3, "lip_press": 0.15,
    "lower_lip_pout": 0.012, "teeth": 0.3,
}


@dataclass(frozen=True)
class GeneratorConfig:
    """Difficulty settings of the generator, stored in the manifest."""

    intensity_range: tuple[float, float] = (0.5, 1.0)
    expression_noise_scale: float = 1.0
    max_roll_deg: float = 15.0
    max_yaw: float = 0.25
    scale_range: tuple[float, float] = (0.25, 0.32)  # face half-width / image size
    max_shift: float = 0.06  # face centre offset / image size
    p_glasses: float = 0.2
    p_hat: float = 0.12
    p_earrings: float = 0.25
    p_necklace: float = 0.2
    max_clutter_shapes: int = 6
    max_blur_sigma: float = 1.2  # pixels at 128 px, scaled with image size
    max_noise_sd: float = 8.0  # grey levels
    p_jpeg: float = 0.6
    jpeg_quality_range: tuple[int, int] = (30, 90)
    offsets: dict = field(default_factory=lambda: EXPRESSION_OFFSETS)
    noise: dict = field(default_factory=lambda: EXPRESSION_NOISE)

    def to_json(self) -> dict:
        """Return the settings as JSON types (tuples become lists), as the manifest stores them."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


# Named difficulty settings for `slfer-parse synth --difficulty`. "standard" is the
# default above. "easy" draws strong expressions with less pose, clutter, blur and
# compression, so that a ResNet-18 trained from scratch for a few epochs on a few
# hundred small images, as in the CPU demo, learns them well above chance.
DIFFICULTY_PRESETS: dict[str, dict] = {
    "standard": {},
    "easy": {
        "intensity_range": (0.85, 1.0),
        "expression_noise_scale": 0.5,
        "max_roll_deg": 6.0,
        "max_yaw": 0.1,
        "scale_range": (0.3, 0.34),
        "max_shift": 0.03,
        "max_clutter_shapes": 2,
        "max_blur_sigma": 0.5,
        "max_noise_sd": 3.0,
        "p_jpeg": 0.2,
        "jpeg_quality_range": (60, 90),
    },
}


def generator_config_for(difficulty: str) -> GeneratorConfig:
    """Return the ``GeneratorConfig`` of a named difficulty preset."""
    if difficulty not in DIFFICULTY_PRESETS:
        raise ValueError(f"unknown difficulty {difficulty!r}; choose one of {sorted(DIFFICULTY_PRESETS)}")
    return GeneratorConfig(**DIFFICULTY_PRESETS[difficulty])


HAIR_STYLES = ("short", "long", "bald", "bun", "curly")

# RGB anchors that skin, hair and iris colours are drawn between.
SKIN_TONES = np.array(
    [[255, 224, 196], [241, 194, 160], [224, 172, 128], [198, 134, 94], [141, 85, 54], [92, 56, 38]],
    dtype=np.float64,
)
HAIR_COLOURS = np.array(
    [[25, 20, 18], [60, 40, 28], [110, 72, 40], [190, 150, 90], [150, 60, 30], [170, 170, 170]],
    dtype=np.float64,
)
IRIS_COLOURS = np.array([[70, 45, 25], [40, 90, 140], [70, 110, 60], [110, 80, 50]], dtype=np.float64)


@dataclass
class FaceParams:
    """Everything needed to draw one face; see the module docstring for units."""

    expression: int
    intensity: float = 0.0
    # Placement and pose.
    center_x: float = 0.5  # fraction of the image width
    center_y: float = 0.46  # fraction of the image height
    scale: float = 0.26  # face half-width as a fraction of the image size
    roll_deg: float = 0.0
    yaw: float = 0.0  # shifts inner features sideways, -1..1
    face_height: float = 1.3  # half-height of the face oval
    chin: float = 0.15  # how pointed the chin is
    # Expression geometry (neutral values).
    eye_y: float = -0.12
    eye_dx: float = 0.38
    eye_width: float = 0.19
    eye_open: float = 1.0
    lower_lid: float = 0.0
    brow_gap: float = 0.2  # brow centre line above the eye centre
    brow_raise: float = 0.0
    brow_inner: float = 0.0  # + lifts the inner brow ends (sad, fear), - lowers them (angry)
    brow_thickness: float = 0.085
    brow_arch: float = 0.04
    nose_length: float = 0.45
    nose_width: float = 0.17
    nose_wrinkle: float = 0.0
    mouth_y: float = 0.62
    mouth_width: float = 0.33
    mouth_corner: float = 0.0  # + lifts the lip corners
    mouth_open: float = 0.0
    mouth_box: float = 0.0  # + squarer opening (stretched lips), - rounder
    upper_lip_raise: float = 0.0
    upper_lip: float = 0.05
    lower_lip: float = 0.065
    lip_press: float = 0.0  # thins both lips
    lower_lip_pout: float = 0.0
    teeth: float = 0.0  # > 0.5 shows the upper teeth when the mouth is open
    asymmetry: float = 1.0  # side (+1 or -1) of the one-sided upper lip raise
    # Appearance.
    skin_rgb: tuple = (230, 180, 140)
    lip_rgb: tuple = (180, 80, 80)
    iris_rgb: tuple = (70, 45, 25)
    hair_style: str = "short"
    hair_rgb: tuple = (40, 30, 20)
    fringe: float = 0.35  # how far the fringe reaches down the forehead
    cloth_rgb: tuple = (40, 60, 120)
    neckline: float = 0.3
    glasses: bool = False
    glasses_rgb: tuple = (20, 20, 20)
    glasses_square: bool = False
    hat: bool = False
    hat_rgb: tuple = (120, 30, 30)
    earrings: bool = False
    earring_rgb: tuple = (230, 200, 60)
    necklace: bool = False
    necklace_rgb: tuple = (220, 220, 230)
    # Scene and camera.
    background_rgb: tuple = (200, 200, 200)
    background_gradient: tuple = (0.0, 0.0, 0.0)  # RGB added across the image width
    clutter: list = field(default_factory=list)  # (kind, geometry in image fractions, rgb)
    light_angle: float = 0.0
    light_strength: float = 0.0  # relative gain change from the dark to the bright side
    brightness: float = 1.0
    blur_sigma: float = 0.0  # pixels at the output size
    noise_sd: float = 0.0
    jpeg_quality: int = 0  # 0: no JPEG round trip


def _mix(rng: np.random.Generator, anchors: np.ndarray) -> tuple:
    """Return a random colour on the segment between two neighbouring anchors."""
    i = int(rng.integers(0, len(anchors) - 1))
    t = rng.random()
    colour = (1 - t) * anchors[i] + t * anchors[i + 1]
    return tuple(int(c) for c in np.clip(colour + rng.normal(0, 6, 3), 0, 255))


def _random_rgb(rng: np.random.Generator, low: int = 0, high: int = 256) -> tuple:
    return tuple(int(c) for c in rng.integers(low, high, 3))


def sample_face_params(
    rng: np.random.Generator, expression: int, size: int, config: GeneratorConfig = GeneratorConfig()
) -> FaceParams:
    """Draw a random face that shows ``expression`` (an index into EXPRESSIONS).

    ``size`` is the output image size in pixels; it only scales the blur.
    """
    if not 0 <= expression < len(EXPRESSIONS):
        raise ValueError(f"expression index {expression} is out of range 0..{len(EXPRESSIONS) - 1}")
    p = FaceParams(expression=expression)
    _sample_expression(rng, p, config)
    _sample_anatomy(rng, p)
    _sample_appearance(rng, p, config)
    _sample_scene(rng, p, size, config)
    return p


def _sample_expression(rng: np.random.Generator, p: FaceParams, config: GeneratorConfig) -> None:
    offsets = config.offsets[EXPRESSIONS[p.expression]]
    p.intensity = float(rng.uniform(*config.intensity_range))
    for name, sd in config.noise.items():
        value = getattr(p, name) + p.intensity * offsets.get(name, 0.0)
        setattr(p, name, float(value + rng.normal(0.0, sd * config.expression_noise_scale)))
    # Keep values in the range the renderer draws sensibly.
    p.eye_open = float(np.clip(p.eye_open, 0.3, 2.0))
    p.mouth_open = float(np.clip(p.mouth_open, 0.0, 0.45))
    p.lower_lid = float(np.clip(p.lower_lid, 0.0, 0.8))
    p.nose_wrinkle = float(np.clip(p.nose_wrinkle, 0.0, 1.5))
    p.upper_lip_raise = float(np.clip(p.upper_lip_raise, 0.0, 0.12))
    p.lip_press = float(np.clip(p.lip_press, 0.0, 0.8))
    p.lower_lip_pout = float(np.clip(p.lower_lip_pout, 0.0, 0.06))
    p.mouth_box = float(np.clip(p.mouth_box, -0.9, 1.2))
    p.asymmetry = 1.0 if rng.random() < 0.5 else -1.0


def _sample_anatomy(rng: np.random.Generator, p: FaceParams) -> None:
    """Vary the individual's proportions independently of the expression."""
    p.face_height = float(rng.uniform(1.2, 1.42))
    p.chin = float(rng.uniform(0.05, 0.3))
    p.eye_y += float(rng.normal(0, 0.025))
    p.eye_dx += float(rng.normal(0, 0.02))
    p.eye_width *= float(rng.uniform(0.88, 1.12))
    p.brow_gap += float(rng.normal(0, 0.015))
    p.brow_thickness *= float(rng.uniform(0.7, 1.4))
    p.brow_arch *= float(rng.uniform(0.3, 1.6))
    p.nose_length *= float(rng.uniform(0.9, 1.1))
    p.nose_width *= float(rng.uniform(0.85, 1.2))
    p.mouth_y += float(rng.normal(0, 0.03))
    p.mouth_width += float(rng.normal(0, 0.02))
    p.upper_lip *= float(rng.uniform(0.7, 1.3))
    p.lower_lip *= float(rng.uniform(0.7, 1.3))


def _sample_appearance(rng: np.random.Generator, p: FaceParams, config: GeneratorConfig) -> None:
    p.skin_rgb = _mix(rng, SKIN_TONES)
    skin = np.array(p.skin_rgb, dtype=np.float64)
    lip = 0.55 * skin + 0.45 * np.array([190.0, 60.0, 70.0])
    p.lip_rgb = tuple(int(c) for c in np.clip(lip * rng.uniform(0.8, 1.0), 0, 255))
    p.iris_rgb = _mix(rng, IRIS_COLOURS)
    p.hair_style = HAIR_STYLES[int(rng.integers(0, len(HAIR_STYLES)))]
    p.hair_rgb = _mix(rng, HAIR_COLOURS)
    p.fringe = float(rng.uniform(0.15, 0.5))
    p.cloth_rgb = _random_rgb(rng, 20, 236)
    p.neckline = float(rng.uniform(0.1, 0.5))
    p.glasses = bool(rng.random() < config.p_glasses)
    p.glasses_rgb = _random_rgb(rng, 0, 120)
    p.glasses_square = bool(rng.random() < 0.5)
    p.hat = bool(rng.random() < config.p_hat)
    p.hat_rgb = _random_rgb(rng, 20, 236)
    p.earrings = bool(rng.random() < config.p_earrings)
    p.earring_rgb = _random_rgb(rng, 150, 256)
    p.necklace = bool(rng.random() < config.p_necklace)
    p.necklace_rgb = _random_rgb(rng, 150, 256)


def _sample_scene(rng: np.random.Generator, p: FaceParams, size: int, config: GeneratorConfig) -> None:
    p.center_x = float(0.5 + rng.uniform(-config.max_shift, config.max_shift))
    p.center_y = float(0.46 + rng.uniform(-config.max_shift, config.max_shift))
    p.scale = float(rng.uniform(*config.scale_range))
    p.roll_deg = float(rng.uniform(-config.max_roll_deg, config.max_roll_deg))
    p.yaw = float(rng.uniform(-config.max_yaw, config.max_yaw))
    p.background_rgb = _random_rgb(rng, 30, 230)
    p.background_gradient = tuple(float(g) for g in rng.normal(0, 30, 3))
    p.clutter = [_sample_clutter_shape(rng) for _ in range(int(rng.integers(0, config.max_clutter_shapes + 1)))]
    p.light_angle = float(rng.uniform(0, 2 * np.pi))
    p.light_strength = float(rng.uniform(0.0, 0.45))
    p.brightness = float(rng.uniform(0.75, 1.15))
    p.blur_sigma = float(rng.uniform(0.0, config.max_blur_sigma) * size / 128)
    p.noise_sd = float(rng.uniform(0.0, config.max_noise_sd))
    p.jpeg_quality = int(rng.integers(*config.jpeg_quality_range)) if rng.random() < config.p_jpeg else 0


def _sample_clutter_shape(rng: np.random.Generator) -> tuple:
    kind = ("rect", "circle", "line")[int(rng.integers(0, 3))]
    x, y = rng.uniform(-0.1, 1.1, 2)
    if kind == "rect":
        geometry = (float(x), float(y), float(rng.uniform(0.05, 0.4)), float(rng.uniform(0.05, 0.4)))
    elif kind == "circle":
        geometry = (float(x), float(y), float(rng.uniform(0.03, 0.2)))
    else:
        x2, y2 = rng.uniform(-0.1, 1.1, 2)
        geometry = (float(x), float(y), float(x2), float(y2), float(rng.uniform(0.005, 0.03)))
    return (kind, geometry, _random_rgb(rng, 0, 256))
