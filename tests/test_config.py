import pytest

from minivseg.config import PRESETS, TrainConfig, parse_args


def test_flags_are_typed():
    cfg = parse_args(["--preset=demo", "--max_steps=7", "--lr=0.5", "--crop_size=65,97",
                      "--scale_range=none", "--resume", "--no-flip", "--data", "/x"])  # fmt: skip
    assert cfg.max_steps == 7 and cfg.lr == 0.5 and cfg.crop_size == (65, 97)
    assert cfg.scale_range is None and cfg.resume is True and cfg.flip is False
    assert cfg.data == "/x" and cfg.preset == "demo"


def test_model_overrides_are_collected():
    cfg = parse_args(
        ["--preset", "demo", "--model.num_slots=40", "--model.memory_update=clustering"]
    )
    assert cfg.model_overrides == {"num_slots": "40", "memory_update": "clustering"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max_step=3"], "did you mean --max_steps"),
        (["--max_steps=three"], "--max_steps=three"),
        (["--crop_size=1,2,3"], "--crop_size"),
        (["--flip=maybe"], "--flip=maybe"),
        (["--preset=nope"], "unknown preset"),
        (["max_steps=3"], "--field=value"),
    ],
)
def test_bad_flags_raise_clear_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


def test_presets():
    names = {"demo", "kitti", "stt_demo", "stt_paper", "vistr_demo", "vistr_official", "dvps_demo",
             "vspw_demo", "vspw", "youtube_vis_demo", "youtube_vis"}  # fmt: skip
    assert set(PRESETS) == names
    assert PRESETS["youtube_vis"]().clip_length == 5 == PRESETS["youtube_vis_demo"]().clip_length
    assert PRESETS["vspw"]().clip_length == 2 and PRESETS["vspw"]().model == "kitti"
    assert PRESETS["dvps_demo"]().model_overrides == {"depth": "true"}
    kitti = PRESETS["kitti"]()
    assert kitti.crop_size == (385, 1249) and kitti.batch_size * kitti.accumulate == 16
    assert kitti.model == "kitti" and kitti.clip_length == 2
    assert isinstance(PRESETS["demo"](), TrainConfig) and PRESETS["stt_demo"]().task == "stt"
