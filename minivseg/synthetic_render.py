"""The renderer of the synthetic street video: one planned street at one frame, to pixels and ids.

`minivseg.synthetic` plans a street (what is where, how it moves); this module films it with a
pinhole camera ``CAM_HEIGHT`` metres above the road, focal length ``FOCAL`` image heights and
the horizon at row ``HORIZON * H``:

- `render_background` ray-casts every pixel to the ground plane (road with dashed and edge lane
  markings, tiled sidewalks, grass verge), to one of two facade planes (buildings with windows,
  rows of trees) or to the sky. Textures (`noise_texture`, 8 texels per metre) are fixed to the
  world, so they move with the scene. The ray's hit also gives the pixel's **depth**: the
  camera-space ``z`` of the surface (distance along the optical axis, not along the ray: KITTI's
  depth-map convention), ``f * CAM_HEIGHT / y`` on the ground row ``y`` px below the horizon,
  ``f * x_facade / x`` on a facade column; 0 for the sky.
- `draw_thing` paints one upright sprite (a `Thing`, sized in metres) into the frame and its
  label. The ground at depth ``z`` is seen on row ``y_horizon + f * CAM_HEIGHT / z``, so an object
  ``h`` metres tall is ``f * h / z`` px tall; painted far to near (`minivseg.synthetic` sorts
  them), nearer things are lower, larger and hide farther ones. Given a ``depth`` map, each
  painted pixel gets its face's ``z`` as well, so the nearest surface's depth is what remains.
  Cars (and boxes) show a rear or front face and the side face that points towards the camera
  axis; people scissor their legs when they cross the street; poles may carry a sign plate (disc,
  square or triangle), labelled traffic sign.
- `void_ring` applies KITTI-STEP's rule that crowd pixels near a tracked instance of their class
  are void (deeplab2 ``data/utils/create_step_panoptic_maps.py``, a 15x15 kernel).

Not from a paper (no equations to cite). Difference from deeplab2: the void ring's radius is
scaled with the image height (7 px at ~375 px, KITTI's height).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from minivseg.panoptic import LABEL_DIVISOR, NUM_CLASSES, VOID_ID

ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, TERRAIN, SKY = 0, 1, 2, 5, 7, 8, 9, 10
PERSON, CAR = 11, 13
CAM_HEIGHT = 1.65  # metres above the road, as KITTI's camera
FOCAL = 2.3  # focal length in units of the image height
HORIZON = 0.42  # horizon row as a fraction of the image height
Z_END = 400.0  # facade rays stop here; a street plan reaches this far beyond the route
BIN = 0.5  # metres per bin of the facade plan along the street
# Class-typical colours and texture strengths; facades get a colour per building instead.
LUT = np.zeros((NUM_CLASSES, 3), np.float32)
LUT[[ROAD, SIDEWALK, POLE]] = (88, 88, 94), (165, 152, 148), (128, 128, 132)
LUT[[VEGETATION, TERRAIN]] = (62, 104, 38), (132, 148, 72)
TEXTURE = np.zeros(NUM_CLASSES, np.float32)
TEXTURE[[ROAD, SIDEWALK, BUILDING, VEGETATION, TERRAIN, SKY]] = 0.1, 0.08, 0.1, 0.45, 0.3, 0.04


@dataclass
class Thing:
    """An upright sprite: world position at frame 0 (lateral x, forward z; metres) and velocity."""

    kind: str  # "car", "person", "pole" or "box"
    x: float
    z: float
    pan_id: int  # panoptic id written for its pixels
    size: tuple  # (width, height, length) in metres
    rgb: np.ndarray  # (P, 3) part colours
    vx: float = 0.0  # metres per frame
    vz: float = 0.0
    extra: dict = field(default_factory=dict)  # gait of people, sign of poles, lateral limits


def noise_texture(rng, size: int = 256) -> np.ndarray:
    """``(size, size)`` tileable noise, zero mean and unit std: three octaves of value noise."""
    out = np.zeros((size, size), np.float32)
    for cells, weight in ((8, 1.0), (32, 0.5), (size, 0.35)):
        grid = np.tile(rng.standard_normal((cells, cells)).astype(np.float32), (2, 2))
        out += weight * ndimage.zoom(grid, size / cells, order=1)[:size, :size]
    return (out - out.mean()) / out.std()


def render_background(street: dict, texture: np.ndarray, camera: tuple, shape: tuple):
    """Ray-cast every pixel to the ground, a facade or the sky.

    ``camera = (cx, horizon_row, ego_z, focal)``. Returns ``image (H, W, 3)`` float32,
    ``semantic (H, W)`` int64 class ids and ``depth (H, W)`` float32: camera-space z in metres,
    0 for the sky, not capped (facades reach ``Z_END``).
    """
    (cx, yh, ego, f), (H, W), plan, edges = camera, shape, street["plan"], street["edges"]
    xs = np.arange(W, dtype=np.float32) + 0.5 - cx  # (W,) column offset from the vanishing point
    ys = np.arange(H, dtype=np.float32) + 0.5 - yh  # (H,) row offset below the horizon
    z_row = f * CAM_HEIGHT / np.maximum(ys, 1e-3)  # (H,) depth of the ground seen in each row
    ground_x, ground_z = xs[None] * z_row[:, None] / f, ego + z_row  # (H, W), (H,) in metres
    facade_x = np.where(xs < 0, edges[0], edges[-1])
    z_col = np.clip(f * facade_x / np.where(np.abs(xs) < 1e-3, 1e-3, xs), 0.1, Z_END)  # (W,)
    side, facade_z = (xs > 0).astype(np.int64), ego + z_col
    b = np.clip((facade_z / BIN).astype(np.int64), 0, plan["cls"].shape[1] - 1)
    cls_col, top_col = plan["cls"][side, b].astype(np.int64), plan["top"][side, b]
    height = CAM_HEIGHT - ys[:, None] * z_col[None] / f  # (H, W) where the ray meets the facade
    facade, sky = height >= 0, height >= top_col[None]
    ground_cls = street["classes"][np.searchsorted(edges, ground_x)]
    cls = np.where(facade, np.where(sky, SKY, cls_col[None]), ground_cls)
    u = (np.where(facade, facade_z[None], ground_x) * 8).astype(np.int64)  # 8 texels per metre,
    v = (np.where(facade, height, ground_z[:, None]) * 8).astype(np.int64)  # fixed to the world
    tex = texture[v & 255, u & 255]  # (H, W)
    # Colour = one palette gather: classes, window, lane paint, sky per row, facade per column.
    window, paint, sky0, facade0 = NUM_CLASSES + np.array([0, 1, 2, 2 + H])
    sky_rgb = np.linspace((110, 160, 215), (225, 230, 235), H, dtype=np.float32)
    palette = np.concatenate([LUT, [(50, 62, 78), (225, 225, 215)], sky_rgb, plan["rgb"][side, b]])
    strength = np.concatenate([TEXTURE, [0.3, 0.05], np.full(H, TEXTURE[SKY]), TEXTURE[cls_col]])
    rows, cols = np.arange(H)[:, None], np.arange(W)[None]
    material = np.where(facade, np.where(sky, sky0 + rows, facade0 + cols), ground_cls)
    frac = lambda a: a - np.floor(a)
    window_z = np.abs(frac(facade_z / plan["window"][side, b]) - 0.5) < 0.22  # (W,)
    windows = (window_z & (cls_col == BUILDING)) & (np.abs(frac(height / 3.2) - 0.55) < 0.22)
    windows &= (height > 2.5) & (height < top_col - 1)
    lines = (np.abs(ground_x + street["lane"] / 2) < 0.07) & (frac(ground_z / 9) < 0.35)[:, None]
    middle, half = (edges[2] + edges[3]) / 2, (edges[3] - edges[2]) / 2 - 0.25  # edge lines
    lines |= np.abs(np.abs(ground_x - middle) - half) < 0.07
    material = np.where(windows, window, material)
    material = np.where((cls == ROAD) & lines, paint, material)
    tiles = (frac(ground_x / 0.7) < 0.1) | (frac(ground_z / 0.7) < 0.1)[:, None]
    gain = (1 + strength[material] * tex) * np.where((cls == SIDEWALK) & tiles, 0.8, 1.0)
    depth = np.where(facade, np.where(sky, 0.0, z_col[None]), z_row[:, None]).astype(np.float32)
    return palette[material] * gain[..., None], cls, depth


def _face(camera, shape, x0, x1, z0, z1, bottom, top):
    """Pixels of an upright world rectangle, heights ``bottom..top``: lateral ``x0..x1`` at depth
    ``z0 == z1`` (facing the camera) or depths ``z0..z1`` at lateral ``x0 == x1`` (a side face).

    Returns ``(box, s, y, z)``: image slices, ``s (1, w)`` metres along the face from its left or
    near edge, ``y (h, w)`` metres above the ground and ``z (1, w)`` the face's camera-space depth
    in each column; ``None`` when it is off-screen.
    """
    (cx, yh, _, f), (H, W), near = camera, shape, min(z0, z1)
    xa, xb = cx + f * x0 / z0, cx + f * x1 / z1
    c0, c1 = max(int(np.floor(min(xa, xb))), 0), min(int(np.ceil(max(xa, xb))), W)
    r0 = max(int(np.floor(yh + f * (CAM_HEIGHT - top) / near)), 0)
    r1 = min(int(np.ceil(yh + f * (CAM_HEIGHT - bottom) / near)), H)
    if c0 >= c1 or r0 >= r1:
        return None
    cols = np.arange(c0, c1, dtype=np.float32) + 0.5 - cx
    if z0 == z1:
        z, s = np.full_like(cols, z0), cols * z0 / f - x0
    else:
        with np.errstate(divide="ignore"):
            z = f * x0 / cols  # (w,) depth where each column's ray meets the side plane
        s = z - z0
    y = CAM_HEIGHT - (np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5 - yh) * z[None] / f
    return (slice(r0, r1), slice(c0, c1)), s[None], y, z[None]


def _paint(image, label, face, parts, pan_id, depth=None):
    """Paint ``parts``, a list of ``(mask (h, w), rgb broadcastable to (h, w, 3))``, into a face
    and write ``pan_id`` (and the face's depth, if ``depth`` is given) under their union."""
    if face is None:
        return
    view, union = image[face[0]], np.zeros(face[2].shape, bool)
    for mask, rgb in parts:
        rgb = np.asarray(rgb, np.float32)
        view[mask] = rgb if rgb.ndim == 1 else np.broadcast_to(rgb, mask.shape + (3,))[mask]
        union |= mask
    label[face[0]][union] = pan_id
    if depth is not None:
        depth[face[0]][union] = np.broadcast_to(face[3], union.shape)[union]


def draw_thing(image, label, thing: Thing, t: int, camera: tuple, depth=None):
    """Paint one thing as it is at frame ``t`` into ``image (H, W, 3)`` and ``label (H, W)``,
    and its camera-space depth into ``depth (H, W)`` when given."""
    shape, (w, h, length), rgb, pid = label.shape, thing.size, thing.rgb, thing.pan_id
    x = np.clip(thing.x + thing.vx * t, *thing.extra.get("limits", (-np.inf, np.inf)))
    z = thing.z + thing.vz * t - camera[2]
    if thing.kind in ("car", "box") and abs(x) > w / 2 + 0.3:  # the side facing the camera axis
        xe = x - np.sign(x) * w / 2
        face = _face(camera, shape, xe, xe, z, z + length, 0.0, h)
        if face is not None:
            a, q = face[1] / length, face[2] / h  # along the side (0 = near end) and up, in [0, 1]
            inside = (a >= 0) & (a <= 1) & (q >= 0)
            if thing.kind == "box":
                parts = [(inside & (q <= 1), rgb[0] * 0.8)]
            else:  # body, cabin and glass towards the near end, two tyres
                ramp = (q - 0.58) / 0.37
                cabin = (q >= 0.58) & (q < 0.97) & (a >= 0) & (a < 0.72 - 0.15 * ramp)
                glass = cabin & (q < 0.92) & (a > 0.06) & (a < 0.68 - 0.15 * ramp)
                tyres = (np.minimum(np.abs(a - 0.18), np.abs(a - 0.82)) * length) ** 2
                tyres = tyres + (face[2] - 0.33) ** 2 < 0.1
                body = inside & (q > 0.12) & (q < 0.58) | cabin
                shade = rgb[0] * (0.55 + 0.3 * q[..., None])
                parts = [(body, shade), (glass, rgb[1]), (tyres, rgb[2])]
            _paint(image, label, face, parts, pid, depth)
    face = _face(camera, shape, x - w / 2, x + w / 2, z, z, 0.0, h)
    if face is None:
        return
    u, q = face[1] / w - 0.5, face[2] / h  # across in [-0.5, 0.5] and up in [0, 1]
    if thing.kind == "car":  # rear (or front) view: body, cabin, glass, tyres, lights, plate
        half = 0.46 - 0.14 * (q - 0.58) / 0.39
        cabin = (q >= 0.58) & (q < 0.97) & (np.abs(u) < half)
        glass = cabin & (q > 0.62) & (q < 0.92) & (np.abs(u) < half - 0.05)
        tyres = (q >= 0) & (q < 0.2) & (np.abs(u) > 0.3) & (np.abs(u) < 0.47)
        lights = (q > 0.38) & (q < 0.48) & (np.abs(u) > 0.33) & (np.abs(u) < 0.47)
        plate = (q > 0.22) & (q < 0.3) & (np.abs(u) < 0.1)
        body = (q >= 0.1) & (q < 0.58) & (np.abs(u) <= 0.5) | cabin
        parts = [(body, rgb[0] * (0.7 + 0.4 * q[..., None])), (glass, rgb[1]), (tyres, rgb[2]),
                 (lights, rgb[3]), (plate, (215, 215, 210))]  # fmt: skip
    elif thing.kind == "person":  # head, torso, arms, legs (scissoring when crossing)
        gait, x_m, y_m = thing.extra, u * w, q * h
        swing = gait["stride"] * 0.3 * np.sin(gait["phase"] + 0.5 * t) * (0.5 - q)
        head = (x_m / 0.11) ** 2 + ((y_m - 0.93 * h) / 0.12) ** 2 < 1
        torso = (q >= 0.5) & (q < 0.85) & (np.abs(x_m) < 0.2)
        arms = (q >= 0.45) & (q < 0.83) & (np.abs(x_m) >= 0.2) & (np.abs(x_m) < 0.27)
        legs = (np.abs(np.abs(x_m + swing) - 0.09) < 0.075) & (q >= 0) & (q < 0.5)
        parts = [(head | arms & (q < 0.58), rgb[0]), (torso | arms & (q >= 0.58), rgb[1]),
                 (legs, rgb[2]), (head & (q > 0.95) | legs & (q < 0.04), rgb[3])]  # fmt: skip
    else:  # a pole (shaded like a cylinder) or a box
        solid = (q >= 0) & (q <= 1) & (np.abs(u) <= 0.5)
        parts = [(solid, rgb[0] * (1.15 - 1.2 * u**2)[..., None])]
    _paint(image, label, face, parts, pid, depth)
    if "shape" in thing.extra:  # a traffic sign plate on top of the pole: disc, square, triangle
        face = _face(camera, shape, x - 0.38, x + 0.38, z - 0.05, z - 0.05, h - 0.8, h)
        if face is not None:
            u, v = face[1] / 0.76 - 0.5, (face[2] - h + 0.4) / 0.76
            r = [np.sqrt(u**2 + v**2), np.maximum(np.abs(u), np.abs(v)),
                 np.maximum(-v, np.abs(u) / 0.55 + v)][thing.extra["shape"]]  # fmt: skip
            sign_rgb = thing.extra["rgb"]
            parts = [(r < 0.5, sign_rgb), (r < 0.36, (sign_rgb + 470) / 3)]
            _paint(image, label, face, parts, SIGN * LABEL_DIVISOR, depth)


def void_ring(panoptic: np.ndarray, radius: int) -> np.ndarray:
    """KITTI-STEP: crowd pixels within ``radius`` px of a tracked instance of the same class become
    void, in place. deeplab2's ``create_step_panoptic_maps.py`` dilates the union of a class's MOTS
    masks with a 15x15 kernel (radius 7 at ~375 px image height)."""
    for cls in (PERSON, CAR):
        crowd = panoptic == cls * LABEL_DIVISOR
        if crowd.any():
            tracked = (panoptic // LABEL_DIVISOR == cls) & ~crowd
            near = ndimage.maximum_filter(tracked, size=2 * radius + 1)
            panoptic[crowd & near] = VOID_ID
    return panoptic
