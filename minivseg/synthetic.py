"""Procedural street-scene videos with KITTI-STEP labels: minivseg's embedded default dataset.

A pinhole camera drives down a street and every pixel is ray-cast to the ground plane (road with
lane markings, paved sidewalk, grass verge), to one of two facade planes (buildings with windows,
rows of trees) or to the sky. Cars (rear and side faces), pedestrians, poles with traffic signs
and unlabeled clutter are upright sprites in metres, painted far to near, so nearer objects are
lower, larger and occlude farther ones. Labels follow KITTI-STEP (facts sheet §6):
``panoptic = semantic * 1000 + instance``, person (11) and car (13) carry track ids that hold for
the whole sequence, so each id's masks form one tube (TubeFormer-DeepLab §3.1); a group of people
standing together is crowd (person, instance 0); clutter is void; and, as in KITTI-STEP, crowd
pixels near a tracked instance of their class are void (``void_ring``).

Differences from KITTI-STEP: rendered, not photographed; 10 of the 19 classes occur (road,
sidewalk, building, pole, traffic sign, vegetation, terrain, sky, person, car); things are drawn
only up to ``Z_FAR`` metres, so a car is at least ~15 px tall at 128 px image height.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from minivseg.panoptic import CLASS_NAMES, LABEL_DIVISOR, NUM_CLASSES, VOID_ID, write_kitti_step_png

ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, TERRAIN, SKY = 0, 1, 2, 5, 7, 8, 9, 10
PERSON, CAR = 11, 13
CAM_HEIGHT = 1.65  # metres above the road, as KITTI's camera
FOCAL = 2.3  # focal length in units of the image height
HORIZON = 0.42  # horizon row as a fraction of the image height
Z_NEAR, Z_FAR, Z_END = 2.5, 30.0, 400.0  # things are drawn at depths Z_NEAR..Z_FAR; street length
BIN = 0.5  # metres per bin of the facade plan along the street
# Class-typical colours and texture strengths; facades get a colour per building instead.
LUT = np.zeros((NUM_CLASSES, 3), np.float32)
LUT[[ROAD, SIDEWALK, POLE]] = (88, 88, 94), (165, 152, 148), (128, 128, 132)
LUT[[VEGETATION, TERRAIN]] = (62, 104, 38), (132, 148, 72)
TEXTURE = np.zeros(NUM_CLASSES, np.float32)
TEXTURE[[ROAD, SIDEWALK, BUILDING, VEGETATION, TERRAIN, SKY]] = 0.1, 0.08, 0.1, 0.45, 0.3, 0.04
FACADES = np.float32(
    [(190, 170, 140), (150, 80, 60), (120, 120, 125), (205, 200, 190), (180, 140, 80)]
)  # beige, brick, concrete, white, ochre
PAINTS = np.float32(
    [(235, 235, 235), (30, 30, 35), (160, 165, 170), (170, 25, 25),
     (30, 60, 150), (90, 95, 100), (20, 90, 60), (200, 170, 40)]
)  # fmt: skip
CLUTTER = np.float32([(60, 80, 60), (110, 85, 60), (150, 150, 140)])


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


def plan_street(rng, route: float) -> dict:
    """Lateral layout (``edges`` in metres, camera at x = 0) and the facade plan of both sides."""
    lane, walk, verge = rng.uniform(3.0, 3.6), rng.uniform(2, 3.5, 2), rng.choice([0, 0, 1.5, 3], 2)
    left, right = -lane * 1.5 - rng.uniform(0, 3), lane * 0.5 + rng.uniform(0.3, 3)
    edges = np.float32([left - walk[0] - verge[0], left - walk[0], left,
                        right, right + walk[1], right + walk[1] + verge[1]])  # fmt: skip
    nbins = int((route + Z_END) / BIN) + 1
    plan = {key: np.zeros((2, nbins), np.float32) for key in ("cls", "top", "window")}
    plan["rgb"] = np.zeros((2, nbins, 3), np.float32)
    for side in range(2):
        start = 0
        while start < nbins:  # buildings and tree rows of 8-35 m along the street
            stop, building = start + int(rng.uniform(8, 35) / BIN), rng.random() < 0.65
            plan["cls"][side, start:stop] = BUILDING if building else VEGETATION
            plan["top"][side, start:stop] = rng.uniform(7, 22) if building else rng.uniform(4, 9)
            plan["window"][side, start:stop] = rng.uniform(2.5, 4.0) if building else 1.0
            facade = FACADES[rng.integers(len(FACADES))] * rng.uniform(0.8, 1.1)
            plan["rgb"][side, start:stop] = facade if building else LUT[VEGETATION]
            start = stop
        crowns = ndimage.gaussian_filter1d(rng.standard_normal(nbins).astype(np.float32), 2) * 4
        plan["top"][side] += (plan["cls"][side] == VEGETATION) * crowns
    classes = np.array([TERRAIN, TERRAIN, SIDEWALK, ROAD, SIDEWALK, TERRAIN, TERRAIN])
    return dict(edges=edges, classes=classes, lane=lane, plan=plan)


def plan_things(rng, street: dict, num_frames: int, ego_speed: float) -> list[Thing]:
    """Parked and moving cars, walking and crossing people, crowds, poles with signs, clutter."""
    edges, lane, route = street["edges"], street["lane"], ego_speed * num_frames + Z_FAR
    things, track_ids = [], iter(range(1, LABEL_DIVISOR))  # KITTI-STEP track ids start at 1

    def car(x, z, vz, lights=(200, 20, 20)):
        size = rng.uniform(1.6, 1.9), rng.uniform(1.4, 1.7), rng.uniform(3.8, 4.8)
        body = PAINTS[rng.integers(len(PAINTS))] * rng.uniform(0.85, 1.1)
        rgb = np.stack([body, (40, 50, 62), (22, 22, 22), lights])  # body, glass, tyres, lights
        things.append(Thing("car", x, z, CAR * LABEL_DIVISOR + next(track_ids), size, rgb, 0, vz))

    def person(x, z, vx=0.0, vz=0.0, crowd=False, limits=(-np.inf, np.inf)):
        skin = np.float32((225, 180, 150)) * rng.uniform(0.45, 1.05)
        shirt, trousers = PAINTS[rng.integers(len(PAINTS))], PAINTS[rng.integers(1, 6)] * 0.6
        rgb = np.stack([skin, shirt, trousers, (35, 25, 20)])  # skin, shirt, trousers, hair+shoes
        pan_id = PERSON * LABEL_DIVISOR + (0 if crowd else next(track_ids))
        gait = dict(phase=rng.uniform(0, 2 * np.pi), stride=min(1.0, 6 * abs(vx)), limits=limits)
        size = (0.55, rng.uniform(1.55, 1.9), 0.3)
        things.append(Thing("person", x, z, pan_id, size, rgb, vx, vz, gait))

    for curb, margin in (
        (edges[2] + 1.1, -1.5 * lane - edges[2]),
        (edges[3] - 1.1, edges[3] - lane / 2),
    ):
        z = rng.uniform(-5, 15) if rng.random() < 0.7 and margin > 2 else route  # parked cars
        while z < route:
            car(curb + rng.uniform(-0.2, 0.2), z, 0.0)
            z += rng.uniform(9, 32)
    if rng.random() < 0.7:  # the car ahead in our lane, sometimes followed by another
        vz, z = ego_speed + rng.uniform(-0.1, 0.1), rng.uniform(9, 22)
        car(0.0, z, vz)
        if rng.random() < 0.3:
            car(0.0, z + rng.uniform(9, 14), vz)
    oncoming = rng.random() < 0.6  # the other lane: oncoming cars, or cars overtaking us
    vz = -rng.uniform(0.3, 0.7) if oncoming else ego_speed + rng.uniform(0.15, 0.35)
    for t_enter in np.cumsum(rng.uniform(12, 45, size=num_frames // 12 + 1)) - 30:
        z_enter = (Z_FAR if oncoming else 3.0) + (ego_speed - vz) * t_enter
        lights = (235, 235, 210) if oncoming else (200, 20, 20)
        car(-lane + rng.uniform(-0.3, 0.3), z_enter, vz, lights)
    for side in range(2):
        lo, hi = edges[1 + 2 * side] + 0.4, edges[2 + 2 * side] - 0.4  # the sidewalk
        for z in np.arange(rng.uniform(-10, 10), route + 10, 11):  # people walking on the sidewalk
            if rng.random() < 0.45:
                person(rng.uniform(lo, hi), z, vz=rng.choice([-1, 1]) * rng.uniform(0.05, 0.13))
        if rng.random() < 0.3:  # a group standing together: crowd, without track ids
            x, z = rng.uniform(lo, hi), rng.uniform(10, route)
            for _ in range(rng.integers(3, 7)):
                person(x + rng.uniform(-0.6, 0.6), z + rng.uniform(-0.5, 0.5), crowd=True)
        for z in np.arange(rng.uniform(0, 25), route, 22):  # poles by the curb, most with a sign
            sign = dict(shape=rng.integers(3), rgb=PAINTS[rng.choice([3, 4, 7])])
            size, grey = (0.22, rng.uniform(3.5, 6), 0.22), LUT[[POLE]] * rng.uniform(0.8, 1.2)
            extra = sign if rng.random() < 0.6 else {}
            x = edges[2] - 0.4 if side == 0 else edges[3] + 0.4
            z = z + rng.uniform(-3, 3)
            things.append(Thing("pole", x, z, POLE * LABEL_DIVISOR, size, grey, extra=extra))
        for z in rng.uniform(0, route, size=rng.poisson(route / 40)):  # unlabeled clutter: void
            size = rng.uniform(0.6, 1.5), rng.uniform(0.7, 1.4), rng.uniform(0.5, 1.2)
            x = edges[1] + 0.7 if side == 0 else edges[4] - 0.7
            rgb = CLUTTER[[rng.integers(len(CLUTTER))]]
            things.append(Thing("box", x, z, VOID_ID, size, rgb))
    if rng.random() < 0.35:  # someone crossing the street, stopping on the far sidewalk
        x, vx = (edges[2] - 1, 0.09) if rng.random() < 0.5 else (edges[3] + 1, -0.09)
        person(x, rng.uniform(12, 25) + ego_speed * rng.uniform(0, num_frames / 2), vx=vx,
               limits=(edges[1] + 0.5, edges[4] - 0.5))  # fmt: skip
    return things


def render_background(street: dict, texture: np.ndarray, camera: tuple, shape: tuple):
    """Ray-cast every pixel to the ground, a facade or the sky.

    ``camera = (cx, horizon_row, ego_z, focal)``. Returns ``image (H, W, 3)`` float32 and
    ``semantic (H, W)`` int64 class ids.
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
    return palette[material] * gain[..., None], cls


def _face(camera, shape, x0, x1, z0, z1, bottom, top):
    """Pixels of an upright world rectangle, heights ``bottom..top``: lateral ``x0..x1`` at depth
    ``z0 == z1`` (facing the camera) or depths ``z0..z1`` at lateral ``x0 == x1`` (a side face).

    Returns ``(box, s, y)``: image slices, ``s (1, w)`` metres along the face from its left or near
    edge and ``y (h, w)`` metres above the ground; ``None`` when it is off-screen.
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
    return (slice(r0, r1), slice(c0, c1)), s[None], y


def _paint(image, label, face, parts, pan_id):
    """Paint ``parts``, a list of ``(mask (h, w), rgb broadcastable to (h, w, 3))``, into a face
    and write ``pan_id`` under their union."""
    if face is None:
        return
    view, union = image[face[0]], np.zeros(face[2].shape, bool)
    for mask, rgb in parts:
        rgb = np.asarray(rgb, np.float32)
        view[mask] = rgb if rgb.ndim == 1 else np.broadcast_to(rgb, mask.shape + (3,))[mask]
        union |= mask
    label[face[0]][union] = pan_id


def draw_thing(image, label, thing: Thing, t: int, camera: tuple):
    """Paint one thing as it is at frame ``t`` into ``image (H, W, 3)`` and ``label (H, W)``."""
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
            _paint(image, label, face, parts, pid)
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
    _paint(image, label, face, parts, pid)
    if "shape" in thing.extra:  # a traffic sign plate on top of the pole: disc, square, triangle
        face = _face(camera, shape, x - 0.38, x + 0.38, z - 0.05, z - 0.05, h - 0.8, h)
        if face is not None:
            u, v = face[1] / 0.76 - 0.5, (face[2] - h + 0.4) / 0.76
            r = [np.sqrt(u**2 + v**2), np.maximum(np.abs(u), np.abs(v)),
                 np.maximum(-v, np.abs(u) / 0.55 + v)][thing.extra["shape"]]  # fmt: skip
            sign_rgb = thing.extra["rgb"]
            parts = [(r < 0.5, sign_rgb), (r < 0.36, (sign_rgb + 470) / 3)]
            _paint(image, label, face, parts, SIGN * LABEL_DIVISOR)


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


def generate_sequence(seed: int, num_frames: int, height: int = 128, width: int = 416):
    """One street-scene video. Returns ``frames (F, H, W, 3)`` uint8 and ``panoptic (F, H, W)``
    int64 ids ``semantic * 1000 + track``; the same arguments give the same bytes."""
    rng = np.random.default_rng(seed)
    ego_speed = rng.uniform(0.15, 0.6)  # metres per frame (KITTI records 10 frames/s)
    street = plan_street(rng, ego_speed * num_frames + Z_FAR)
    things = plan_things(rng, street, num_frames, ego_speed)
    texture = noise_texture(rng)
    sway = rng.uniform(0.01, 0.05) * width, rng.uniform(40, 150), rng.uniform(0, 2 * np.pi)
    tint = (rng.uniform(0.85, 1.1) * rng.uniform(0.95, 1.05, 3)).astype(np.float32)
    radius = max(1, round(7 * height / 375))  # KITTI-STEP's 15x15 kernel, scaled
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    panoptic = np.empty((num_frames, height, width), np.int64)
    for t in range(num_frames):
        cx = width / 2 + sway[0] * np.sin(2 * np.pi * t / sway[1] + sway[2])  # the camera yaws
        camera = (cx, HORIZON * height, ego_speed * t, FOCAL * height)
        image, cls = render_background(street, texture, camera, (height, width))
        label = cls * LABEL_DIVISOR
        depth = np.array([thing.z + thing.vz * t for thing in things]) - camera[2]
        for k in np.argsort(-depth, kind="stable"):  # painter's order: far to near
            if Z_NEAR < depth[k] < Z_FAR:
                draw_thing(image, label, things[k], t, camera)
        image *= tint
        image += rng.standard_normal((height, width, 1), dtype=np.float32) * 3  # sensor noise
        frames[t] = np.clip(image, 0, 255, out=image)
        panoptic[t] = void_ring(label, radius)
    return frames, panoptic


def sequence_seed(seed: int, index: int) -> int:
    """Seed of sequence ``index`` in a dataset written with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def write_dataset(out, train_seqs: int, val_seqs: int, num_frames: int, seed: int = 0,
                  height: int = 128, width: int = 416) -> dict:  # fmt: skip
    """Write ``out/{images,panoptic_maps}/SPLIT/SSSS/FFFFFF.png`` (KITTI-STEP layout).

    Sequence ids run on across splits (train ``0000..N-1``, val ``N..N+M-1``); sequence ``i`` is
    ``generate_sequence(sequence_seed(seed, i), ...)``. Prints a line per sequence and
    returns ``frames``, ``seconds`` and ``frames_per_second`` of generation, ``class_share``.
    """
    out, counts, seconds = Path(out), np.zeros(NUM_CLASSES + 1, np.int64), 0.0
    for index in range(train_seqs + val_seqs):
        split, start = "train" if index < train_seqs else "val", time.perf_counter()
        frames, panoptic = generate_sequence(sequence_seed(seed, index), num_frames, height, width)
        seconds += time.perf_counter() - start
        for t in range(num_frames):
            name = f"{split}/{index:04d}/{t:06d}.png"
            (out / "images" / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(frames[t]).save(out / "images" / name)
            write_kitti_step_png(out / "panoptic_maps" / name, panoptic[t])
        semantic = np.minimum(panoptic // LABEL_DIVISOR, NUM_CLASSES)  # void counted last
        counts += np.bincount(semantic.ravel(), minlength=NUM_CLASSES + 1)
        tracks = np.unique(panoptic[(panoptic % LABEL_DIVISOR > 0) & (semantic < NUM_CLASSES)])
        print(f"{split}/{index:04d}: {num_frames} frames, {len(tracks)} tracks, "
              f"{time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
    names, total = (*CLASS_NAMES, "void"), (train_seqs + val_seqs) * num_frames
    share = {names[c]: float(counts[c] / counts.sum()) for c in np.flatnonzero(counts)}
    return dict(frames=total, seconds=seconds, frames_per_second=total / max(seconds, 1e-9),
                class_share=share)  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic KITTI-STEP-layout dataset.")
    parser.add_argument("--out", required=True, help="dataset root")
    parser.add_argument("--train-seqs", type=int, default=4, help="training sequences")
    parser.add_argument("--val-seqs", type=int, default=1, help="validation sequences")
    parser.add_argument("--frames", type=int, default=50, help="frames per sequence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=416)
    args = parser.parse_args(argv)
    summary = write_dataset(args.out, args.train_seqs, args.val_seqs, args.frames, args.seed,
                            args.height, args.width)  # fmt: skip
    rate = summary["frames_per_second"]
    print(f"wrote {summary['frames']} frames to {args.out} ({rate:.0f} frames/s generated)")
    print("class pixel shares:")
    for name, share in summary["class_share"].items():
        print(f"  {name:<14}{100 * share:6.2f} %")


if __name__ == "__main__":
    main()
