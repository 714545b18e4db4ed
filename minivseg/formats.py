"""Dataset layouts: which one a root holds, and one `open_split` for all of them.

=============  ==============================================  ==============================
format         layout (module)                                 labels
=============  ==============================================  ==============================
kitti-step     ``images/SPLIT/SEQ/*.png`` + ``panoptic_maps``  panoptic (+ depth: DVPS)
               (`minivseg.kitti_step`)
vspw           ``SPLIT.txt`` + ``data/VIDEO/{origin,mask}``    semantic, 124 classes
               (`minivseg.vspw`)
youtube-vis    ``SPLIT/JPEGImages/VIDEO/*.jpg`` + JSON          instance tracks, 40 categories
               (`minivseg.youtube_vis`)
=============  ==============================================  ==============================

``detect_format(root)`` names the layout from the files it finds (``--data_format=auto``, the
default everywhere); a root that matches none raises `DatasetError` saying what each layout
needs. ``python -m minivseg.data --check ROOT`` validates any of them.
"""

from __future__ import annotations

from pathlib import Path

from minivseg.splits import DatasetError, VideoSplit

FORMATS = ("kitti-step", "vspw", "youtube-vis")


def detect_format(root) -> str:
    """The layout of ``root``: kitti-step (``images/``), vspw (``data/`` and
    ``label_num_dic_final.json``) or youtube-vis (``*/JPEGImages``)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder")
    if (root / "images").is_dir():
        return "kitti-step"
    if (root / "data").is_dir() and (root / "label_num_dic_final.json").is_file():
        return "vspw"
    if any(path.is_dir() for path in root.glob("*/JPEGImages")):
        return "youtube-vis"
    raise DatasetError(
        f"{root}: not a dataset root: expected images/ (KITTI-STEP), data/ with "
        "label_num_dic_final.json (VSPW) or SPLIT/JPEGImages/ (YouTube-VIS)"
    )


def open_split(root, split: str, data_format: str = "auto", labels=None,
               decode: bool = True) -> VideoSplit:  # fmt: skip
    """Open ``split`` of the dataset at ``root``. ``labels=None``: labelled iff the split has
    labels. ``decode=False`` skips KITTI-STEP's decoding of every frame (VSPW and YouTube-VIS
    only list and check files when opened; their ``check()`` decodes)."""
    data_format = detect_format(root) if data_format == "auto" else data_format
    if data_format == "kitti-step":
        from minivseg.kitti_step import KittiStepSplit

        return KittiStepSplit(root, split, labels, decode)
    if data_format == "vspw":
        from minivseg.vspw import VSPWSplit

        return VSPWSplit(root, split, labels)
    if data_format == "youtube-vis":
        from minivseg.youtube_vis import YouTubeVISSplit

        return YouTubeVISSplit(root, split, labels)
    raise DatasetError(f"unknown data format {data_format!r}: auto, {', '.join(FORMATS)}")
