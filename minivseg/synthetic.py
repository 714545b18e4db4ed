"""Procedural street-scene videos with KITTI-STEP labels: minivseg's embedded dataset.

``make demo``, the tests and the lessons train and evaluate on this data, so nothing is
downloaded; the real KITTI-STEP is read by the same loader (`minivseg.data`). This module plans a
street and how its things move (`plan_street`, `plan_things`) and writes datasets;
`minivseg.synthetic_render` films the plan, frame by frame.

**What is in a sequence.** A pinhole camera (1.65 m above the road, KITTI's aspect, 128x416 by
default) drives along a street at 0.15-0.6 m per frame and slowly yaws, so the whole scene
scrolls. Every pixel is ray-cast to one of three things:

- the ground: a two-lane road with dashed and edge lane markings, tiled sidewalks, and sometimes
  a grass verge (terrain);
- two facade planes: buildings with windows, 7-22 m tall, in five facade colours, alternating
  with rows of trees (vegetation);
- the sky.

On top of that stand upright sprites in metres, at depths ``Z_NEAR..Z_FAR``:

- parked cars along the curbs, a car ahead in our lane, oncoming or overtaking cars in the other
  lane; each car has its own paint;
- people walking on the sidewalks, groups standing together, sometimes one crossing the street;
  each person has their own skin, shirt and trouser colours;
- poles by the curb, most carrying a traffic sign (disc, square or triangle);
- boxes on the sidewalk (clutter).

Each sequence gets its own lighting tint and per-frame sensor noise.

**Labels** follow KITTI-STEP (STEP, Weber et al. 2021; the format is in `minivseg.panoptic`):
``panoptic = semantic * 1000 + instance`` with the 19 Cityscapes train ids, of which ten occur:
road, sidewalk, building, pole, traffic sign, vegetation, terrain, sky, person and car.

- Person and car carry **track ids**. An id is never reused in a sequence and keeps its class,
  so one id's masks over time form one tube (TubeFormer-DeepLab §3.1; the section numbers no
  equations). Objects enter and leave the frame, and hide each other.
- Groups of people standing together are **crowd** (person, instance 0).
- Boxes on the sidewalk are **void** (255).
- Crowd pixels within a few pixels of a tracked instance of the same class are also void:
  KITTI-STEP's rule (deeplab2 ``data/utils/create_step_panoptic_maps.py``, 15x15 kernel), scaled
  to the image height (`minivseg.synthetic_render.void_ring`).
- Label PNGs are encoded as that deeplab2 script writes them: R = class, G*256+B = instance
  (`minivseg.panoptic.write_kitti_step_png`).

**Depth** (for DVPS, ViP-DeepLab; TubeFormer-DeepLab §2 "DVPS"): every pixel's metric depth is
the camera-space ``z`` of the nearest surface it sees (the distance along the optical axis, as in
KITTI's depth maps), exact and dense. It is 0 = no depth for the sky and for surfaces beyond
``MAX_DEPTH`` = 80 m (distant facades, the road near the horizon), not clipped to 80 m: KITTI
depth evaluations leave ground truth beyond 80 m out (the 80 m cap of the Eigen-split protocol),
deeplab2's DVPS data and metrics read 0 as "no depth" (``ignore_depth = 0``, valid pixels are
``depth > 0``), and a clipped 80 would teach a wrong depth. Where a thing covers the ground or a
facade, the thing's depth is written. Depth is stored as DVPS does: 16-bit PNG of metres * 256
(`minivseg.panoptic.write_depth_png`).

Differences from KITTI-STEP: rendered, not photographed; 10 of the 19 classes occur; things are
drawn only up to ``Z_FAR`` = 30 m away by default, so a car is about 15 px tall or more at 128 px
height; ``make demo`` writes its data with ``--z-far 20`` (``z_far=20``): the far, tiny things are
gone, the median car is taller, and everything else is drawn as before (the random plan differs,
because the street's length depends on it).
Differences from SemKITTI-DVPS's depth: dense and noiseless, where that is one LiDAR scan
projected into the image (sparse); people are flat sprites, so their depth is one ``z`` each.

**Use**::

    python -m minivseg.synthetic --out data/synthetic --train-seqs 8 --val-seqs 2 --frames 50 \
        --seed 0 [--height 128 --width 416 --z-far 30]

writes ``images/SPLIT/SSSS/FFFFFF.png`` (RGB), ``panoptic_maps/SPLIT/SSSS/FFFFFF.png`` and
``depth/SPLIT/SSSS/FFFFFF.png`` (``--no-depth``: no depth folder).
Sequence ids run on across splits: train ``0000..N-1``, val ``N..N+M-1``. The command prints one
line per sequence and a summary with the class pixel shares and the share of pixels with depth.
In Python, `generate_sequence` renders one video (the same arguments give the same bytes;
``depth=True`` adds its depth maps) and `write_dataset` writes a dataset
(sequence ``i`` uses ``sequence_seed(seed, i)``). ``--format vspw`` / ``--format youtube-vis``
write the same sequences in VSPW's layout (semantic masks; the 19 classes as VSPW values 1..19,
void as 255; splits train/val) or YouTube-VIS's (2021 layout, splits train/valid; person and car
are the categories, their tracks the instances, crowd groups ``iscrowd`` annotations, everything
else background; the valid split keeps its annotations so that it can be scored offline), through
`minivseg.vspw.write_split` and `minivseg.youtube_vis.write_split` (`write_in_format`); frames
are JPEG there, as in those datasets. Generation speed, dataset size, class shares
and track statistics are measured at the end of ``lessons/00_tubes_and_data.py``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from minivseg.panoptic import (
    CLASS_NAMES,
    LABEL_DIVISOR,
    MAX_DEPTH,
    NUM_CLASSES,
    THING_CLASSES,
    VOID_ID,
    write_depth_png,
    write_kitti_step_png,
)
from minivseg.synthetic_render import (
    BIN,
    BUILDING,
    CAR,
    FOCAL,
    HORIZON,
    LUT,
    PERSON,
    POLE,
    ROAD,
    SIDEWALK,
    TERRAIN,
    VEGETATION,
    Z_END,
    Thing,
    draw_thing,
    noise_texture,
    render_background,
    void_ring,
)

Z_NEAR, Z_FAR = 2.5, 30.0  # things are drawn at depths Z_NEAR..Z_FAR metres
# Colours chosen per building, car, person and box.
FACADES = np.float32(
    [(190, 170, 140), (150, 80, 60), (120, 120, 125), (205, 200, 190), (180, 140, 80)]
)  # beige, brick, concrete, white, ochre
PAINTS = np.float32(
    [(235, 235, 235), (30, 30, 35), (160, 165, 170), (170, 25, 25),
     (30, 60, 150), (90, 95, 100), (20, 90, 60), (200, 170, 40)]
)  # fmt: skip
CLUTTER = np.float32([(60, 80, 60), (110, 85, 60), (150, 150, 140)])


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


def plan_things(rng, street: dict, num_frames: int, ego_speed: float,
                z_far: float = Z_FAR) -> list[Thing]:  # fmt: skip
    """Parked and moving cars, walking and crossing people, crowds, poles with signs, clutter."""
    edges, lane, route = street["edges"], street["lane"], ego_speed * num_frames + z_far
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
        z_enter = (z_far if oncoming else 3.0) + (ego_speed - vz) * t_enter
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


def generate_sequence(seed: int, num_frames: int, height: int = 128, width: int = 416,
                      depth: bool = False, z_far: float = Z_FAR):  # fmt: skip
    """One street-scene video. Returns ``frames (F, H, W, 3)`` uint8 and ``panoptic (F, H, W)``
    int64 ids ``semantic * 1000 + track``; the same arguments give the same bytes.

    ``depth=True`` also returns ``depth (F, H, W)`` float32 metres: the camera-space z of the
    nearest surface in each pixel (KITTI's depth-map convention), 0 = no depth for the sky and
    for surfaces beyond ``MAX_DEPTH``. Frames and panoptic maps are the same either way.
    ``z_far``: things (cars, people, poles, boxes) are drawn only while nearer than this, in
    metres; ``make demo`` uses 20 (bigger things on screen), the default is 30.
    """
    if not Z_NEAR < z_far <= Z_END:
        raise ValueError(f"z_far must lie in ({Z_NEAR}, {Z_END}] metres, got {z_far}")
    rng = np.random.default_rng(seed)
    ego_speed = rng.uniform(0.15, 0.6)  # metres per frame (KITTI records 10 frames/s)
    street = plan_street(rng, ego_speed * num_frames + z_far)
    things = plan_things(rng, street, num_frames, ego_speed, z_far)
    texture = noise_texture(rng)
    sway = rng.uniform(0.01, 0.05) * width, rng.uniform(40, 150), rng.uniform(0, 2 * np.pi)
    tint = (rng.uniform(0.85, 1.1) * rng.uniform(0.95, 1.05, 3)).astype(np.float32)
    radius = max(1, round(7 * height / 375))  # KITTI-STEP's 15x15 kernel, scaled
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    panoptic = np.empty((num_frames, height, width), np.int64)
    depths = np.empty((num_frames, height, width), np.float32)
    for t in range(num_frames):
        cx = width / 2 + sway[0] * np.sin(2 * np.pi * t / sway[1] + sway[2])  # the camera yaws
        camera = (cx, HORIZON * height, ego_speed * t, FOCAL * height)
        image, cls, frame_depth = render_background(street, texture, camera, (height, width))
        label = cls * LABEL_DIVISOR
        distance = np.array([thing.z + thing.vz * t for thing in things]) - camera[2]
        for k in np.argsort(-distance, kind="stable"):  # painter's order: far to near
            if Z_NEAR < distance[k] < z_far:
                draw_thing(image, label, things[k], t, camera, frame_depth)
        image *= tint
        image += rng.standard_normal((height, width, 1), dtype=np.float32) * 3  # sensor noise
        frames[t] = np.clip(image, 0, 255, out=image)
        panoptic[t] = void_ring(label, radius)
        depths[t] = np.where(frame_depth <= MAX_DEPTH, frame_depth, 0.0)  # beyond: no depth
    return (frames, panoptic, depths) if depth else (frames, panoptic)


def sequence_seed(seed: int, index: int) -> int:
    """Seed of sequence ``index`` in a dataset written with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def write_dataset(out, train_seqs: int, val_seqs: int, num_frames: int, seed: int = 0,
                  height: int = 128, width: int = 416, depth: bool = True,
                  z_far: float = Z_FAR) -> dict:  # fmt: skip
    """Write ``out/{images,panoptic_maps,depth}/SPLIT/SSSS/FFFFFF.png`` (KITTI-STEP layout, and
    depth PNGs of metres * 256 as DVPS; ``depth=False`` skips them).

    Sequence ids run on across splits (train ``0000..N-1``, val ``N..N+M-1``); sequence ``i`` is
    ``generate_sequence(sequence_seed(seed, i), ...)``. Prints a line per sequence and
    returns ``frames``, ``seconds`` and ``frames_per_second`` of generation, ``class_share`` and,
    with depth, ``depth_share`` (the share of pixels that have a depth).
    """
    out, counts, seconds = Path(out), np.zeros(NUM_CLASSES + 1, np.int64), 0.0
    with_depth = 0
    for index in range(train_seqs + val_seqs):
        split, start = "train" if index < train_seqs else "val", time.perf_counter()
        size = (height, width)
        frames, panoptic, depths = generate_sequence(sequence_seed(seed, index), num_frames, *size,
                                                     depth=True, z_far=z_far)  # fmt: skip
        seconds += time.perf_counter() - start
        with_depth += int(np.count_nonzero(depths))
        for t in range(num_frames):
            name = f"{split}/{index:04d}/{t:06d}.png"
            (out / "images" / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(frames[t]).save(out / "images" / name)
            write_kitti_step_png(out / "panoptic_maps" / name, panoptic[t])
            if depth:
                write_depth_png(out / "depth" / name, depths[t])
        semantic = np.minimum(panoptic // LABEL_DIVISOR, NUM_CLASSES)  # void counted last
        counts += np.bincount(semantic.ravel(), minlength=NUM_CLASSES + 1)
        tracks = np.unique(panoptic[(panoptic % LABEL_DIVISOR > 0) & (semantic < NUM_CLASSES)])
        print(f"{split}/{index:04d}: {num_frames} frames, {len(tracks)} tracks, "
              f"{time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
    names, total = (*CLASS_NAMES, "void"), (train_seqs + val_seqs) * num_frames
    share = {names[c]: float(counts[c] / counts.sum()) for c in np.flatnonzero(counts)}
    summary = dict(frames=total, seconds=seconds, frames_per_second=total / max(seconds, 1e-9),
                   class_share=share)  # fmt: skip
    if depth:
        summary["depth_share"] = with_depth / max(int(counts.sum()), 1)
    return summary


def write_in_format(out, data_format: str, train_seqs: int, val_seqs: int, num_frames: int,
                    seed: int = 0, height: int = 128, width: int = 416,
                    z_far: float = Z_FAR) -> None:  # fmt: skip
    """The sequences `write_dataset` writes, in VSPW's or YouTube-VIS's layout."""
    if data_format == "vspw":  # every class, VSPW's values 1..19
        from minivseg.vspw import write_split

        splits, classes = ("train", "val"), CLASS_NAMES
    elif data_format == "youtube-vis":  # the thing classes are the categories
        from minivseg.youtube_vis import write_split

        splits, classes = ("train", "valid"), {c: CLASS_NAMES[c] for c in THING_CLASSES}
    else:
        raise ValueError(f"unknown format {data_format!r}: kitti-step, vspw or youtube-vis")

    def videos(indices):
        for index in indices:
            start = time.perf_counter()
            frames, panoptic = generate_sequence(sequence_seed(seed, index), num_frames, height,
                                                 width, z_far=z_far)  # fmt: skip
            print(f"{index:04d}: {num_frames} frames, {time.perf_counter() - start:.1f} s",
                  flush=True)  # fmt: skip
            yield f"{index:04d}", frames, panoptic

    write_split(out, splits[0], videos(range(train_seqs)), classes)
    write_split(out, splits[1], videos(range(train_seqs, train_seqs + val_seqs)), classes)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic street-video dataset.")
    parser.add_argument("--out", required=True, help="dataset root")
    parser.add_argument("--train-seqs", type=int, default=4, help="training sequences")
    parser.add_argument("--val-seqs", type=int, default=1, help="validation sequences")
    parser.add_argument("--frames", type=int, default=50, help="frames per sequence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=416)
    parser.add_argument("--no-depth", action="store_true", help="do not write depth/ PNGs")
    far = f"things are drawn up to this many metres away (default {Z_FAR:g})"
    parser.add_argument("--z-far", type=float, default=Z_FAR, help=far)
    layouts = ("kitti-step", "vspw", "youtube-vis")
    parser.add_argument("--format", default="kitti-step", choices=layouts, help="dataset layout")
    args = parser.parse_args(argv)
    if args.format != "kitti-step":
        write_in_format(args.out, args.format, args.train_seqs, args.val_seqs, args.frames,
                        args.seed, args.height, args.width, args.z_far)  # fmt: skip
        print(f"wrote {args.train_seqs + args.val_seqs} sequences ({args.format}) to {args.out}")
        return
    summary = write_dataset(args.out, args.train_seqs, args.val_seqs, args.frames, args.seed,
                            args.height, args.width, depth=not args.no_depth,
                            z_far=args.z_far)  # fmt: skip
    rate = summary["frames_per_second"]
    print(f"wrote {summary['frames']} frames to {args.out} ({rate:.0f} frames/s generated)")
    if "depth_share" in summary:
        print(f"pixels with depth: {100 * summary['depth_share']:.2f} %")
    print("class pixel shares:")
    for name, share in summary["class_share"].items():
        print(f"  {name:<14}{100 * share:6.2f} %")


if __name__ == "__main__":
    main()
