"""The synthetic world's constants as the demo and its base use them (one place for every stage).

Images and frames are `SIDE` px squares; the base model's tower sees one `SIDE` px tile per view with
`PATCH` px patches, so a `GRID x GRID` patch grid covers the image. The Set-of-Marks digits of an 84 px
image are 3x5 px glyphs on a 5x7 px box, and the world centres every label in a patch of that grid
(`LABEL_GRID`): one patch holds a whole label, which a 2M-parameter tower learns to read in minutes,
while labels straddling patch borders stayed near chance after hours of tower training.
"""
from __future__ import annotations

from data_gen.synthetic_scene import COLOURS, SHAPES, SIZES, TEXTURES, Difficulty

SIDE = 84  # image / frame side of every world medium (px)
PATCH = 14  # tower patch side (px)
GRID = SIDE // PATCH  # patches per side of one view
FRAMES = 6  # frames per world video
WORLD_DIFFICULTY = "medium"  # the Inst-IT world, its QA scenes and the held-out bench: 2-4 instances
# The base's generic scenes: 1-4 instances, some small, some overlapping (the bench's range and a bit easier).
BASE_DIFFICULTY = Difficulty(1, 4, small=0.2, occlusion=0.2)
BASE_VIDEO_DIFFICULTY = Difficulty(1, 3, small=0.1, occlusion=0.1)

# Dense labels of the tower stage: class 0 is "background / none" in every head.
COLOUR_CLASSES = ("none", *COLOURS)
SHAPE_CLASSES = ("none", *SHAPES)
TEXTURE_CLASSES = ("none", *TEXTURES)
SIZE_CLASSES = ("none", *SIZES)
DIGIT_CLASSES = ("none", *"0123456789")
MAX_COUNT = 7  # the count head predicts 0..MAX_COUNT instances

# Set-of-Marks label boxes: "plain" (the reference look) or "id" (filled with each ID's colour).
MARK_LABEL_BOX = "plain"
# Numeric labels only, no mask tint or contour: on 84 px objects the tint and the ID-coloured contours
# recolour most of an instance (a linear probe of the base's visual tokens reads the colour of instance
# patches at 98% unmarked, 62% with tint + contour, 97% with labels only; `python -m demo.mark_probe`).
MASK_MARKS = False
LABEL_GRID = PATCH  # Set-of-Marks labels centred in the tower's patch cells (data_gen.som label_grid)
GROUP_BY = "level"  # one Inst-IT conversation per annotation level: every sample fits the 512-token context
QA_PER_ITEM = 12  # bench-style training questions per training image / video (the bench asks 3)
