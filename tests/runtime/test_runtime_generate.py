"""``sixbit-tune generate`` end to end on a tiny pipeline."""

from __future__ import annotations

import importlib.util
import json

import pytest
from rt_helpers import get_pipe

from sixbit_tune import policy as P
from sixbit_tune.cli import main
from sixbit_tune.runtime import make_static_policy


@pytest.fixture(scope="module")
def wan_policy(tmp_path_factory):
    path = tmp_path_factory.mktemp("pol") / "wan.json"
    P.save(make_static_policy(get_pipe("wan"), "nvfp4", 1.0, warmup=1, cooldown=1), path)
    return path


def test_generate_writes_a_gif_and_prints_the_statistics(wan_policy, tmp_path, capsys):
    out = tmp_path / "video.gif"
    stats = tmp_path / "stats.json"
    rc = main(["generate", "--model", "tiny:wan", "--policy", str(wan_policy), "--prompt", "a red car",
               "--out", str(out), "--steps", "5", "--seed", "3", "--stats-json", str(stats)])
    assert rc == 0
    import imageio.v3 as iio

    video = iio.imread(out, index=None)
    assert video.shape[0] == 9 and video.shape[1:3] == (16, 16)
    text = capsys.readouterr().out
    assert "NVFP4 layer-calls 100.0%" in text and "execution: nvfp4=reference" in text
    data = json.loads(stats.read_text())
    assert data["nvfp4_share"] == 1.0 and data["skipped_blocks"] > 0 and data["num_inference_steps"] == 5


def test_generate_writes_png_frames_into_a_folder(wan_policy, tmp_path):
    out = tmp_path / "frames"
    assert main(["generate", "--model", "tiny:wan", "--policy", str(wan_policy), "--prompt", "a cat",
                 "--out", str(out), "--steps", "2", "--guidance", "1.0"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"frame_{i:04d}.png" for i in range(9)]


def test_generate_refuses_a_policy_for_another_model(wan_policy, tmp_path, capsys):
    rc = main(["generate", "--model", "tiny:ltx", "--policy", str(wan_policy), "--prompt", "a cat",
               "--out", str(tmp_path / "v.gif"), "--steps", "2"])
    assert rc == 2
    assert "policy is for WanTransformer3DModel, model is LTXVideoTransformer3DModel" in capsys.readouterr().err
    assert not (tmp_path / "v.gif").exists()


def test_generate_rejects_an_unknown_output_kind(wan_policy, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "tiny:wan", "--policy", str(wan_policy), "--prompt", "a cat",
              "--out", str(tmp_path / "v.avi")])
    assert e.value.code == 2


@pytest.mark.skipif(importlib.util.find_spec("imageio_ffmpeg") is not None, reason="imageio-ffmpeg is installed")
def test_generate_mp4_without_ffmpeg_plugin_says_what_to_install(wan_policy, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--model", "tiny:wan", "--policy", str(wan_policy), "--prompt", "a cat",
              "--out", str(tmp_path / "v.mp4")])
    assert "imageio-ffmpeg" in capsys.readouterr().err
