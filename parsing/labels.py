"""Label sets shared by every stage: expression classes and face-part classes.

These tuples are the one source of truth for class ids in this project. Dataset
readers map their native labels onto ``EXPRESSIONS`` by name, and mask archives
store the names they were written with so that a reader can check them.
"""

from __future__ import annotations

# Canonical expression order, as the SLFER paper lists the classes.
EXPRESSIONS: tuple[str, ...] = (
    "angry",
    "disgust",
    "fear",
    "happy",
    "sad",
    "surprise",
    "neutral",
)

# Output channels of facexlib's BiSeNet(num_class=19), in the model's own order.
# This differs from the order in the CelebAMask-HQ README.
FACE_PARTS_19: tuple[str, ...] = (
    "background",
    "skin",
    "l_brow",
    "r_brow",
    "l_eye",
    "r_eye",
    "eye_g",
    "l_ear",
    "r_ear",
    "ear_r",
    "nose",
    "mouth",
    "u_lip",
    "l_lip",
    "neck",
    "neck_l",
    "cloth",
    "hair",
    "hat",
)

# Coarse classes that the segmentation and component tasks learn.
FACE_PARTS_8: tuple[str, ...] = (
    "background",
    "skin",
    "eye",
    "ear",
    "nose",
    "mouth",
    "neck",
    "hair",
)

# Default 19 -> 8 merge: entry i is the coarse class of fine class i. Brows and
# glasses count as "eye", lips as "mouth", cloth and necklace as "neck", hat as
# "hair". Left and right parts share one coarse class, so a horizontal flip
# leaves an 8-class map valid.
DEFAULT_MERGE_19_TO_8: tuple[int, ...] = (
    0,  # background
    1,  # skin
    2, 2, 2, 2, 2,  # l_brow, r_brow, l_eye, r_eye, eye_g
    3, 3, 3,  # l_ear, r_ear, ear_r
    4,  # nose
    5, 5, 5,  # mouth, u_lip, l_lip
    6, 6, 6,  # neck, neck_l, cloth
    7, 7,  # hair, hat
)

# Fine classes that swap under a horizontal flip (left <-> right).
FLIP_PAIRS_19: tuple[tuple[int, int], ...] = ((2, 3), (4, 5), (7, 8))

# Number of dominant components marked positive in the component task; the SLFER
# paper finds n = 4 best.
DEFAULT_TOP_N = 4
