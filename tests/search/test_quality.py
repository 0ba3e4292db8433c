"""Quality metrics against the unquantized reference, and the reference cache."""

from __future__ import annotations

import math

import pytest
import torch

from sixbit_tune.errors import NonFiniteError
from sixbit_tune.search.quality import (
    PSNR_CAP_DB,
    Generation,
    GenerationSettings,
    ReferenceCache,
    compare,
    lpips_available,
)


def _video(seed: int, frames: int = 5, side: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(frames, 3, side, side, generator=g)


def test_psnr_is_over_the_whole_video_and_ssim_is_a_frame_mean():
    from torchmetrics.functional.image import structural_similarity_index_measure

    ref = Generation(_video(0), torch.randn(1, 4, 2, 2, 2))
    noisy = ref.video.clone()
    noisy[0] += 0.1  # only the first frame differs
    gen = Generation(noisy, ref.latents * 1.01)
    q = compare(gen, ref)
    mse = float(((noisy - ref.video) ** 2).mean())
    assert q["psnr_db"] == pytest.approx(10 * math.log10(1.0 / mse), rel=1e-5)
    per_frame = [
        float(structural_similarity_index_measure(noisy[i : i + 1], ref.video[i : i + 1], data_range=1.0))
        for i in range(5)
    ]
    assert q["ssim"] == pytest.approx(sum(per_frame) / 5, rel=1e-5)
    assert per_frame[1] == pytest.approx(1.0) and per_frame[0] < 1.0
    assert q["latent_rel_l2"] == pytest.approx(0.01, rel=1e-4)


def test_identical_videos_get_the_cap_and_bad_outputs_are_errors():
    ref = Generation(_video(1), torch.ones(2, 3))
    assert compare(Generation(ref.video.clone(), ref.latents.clone()), ref)["psnr_db"] == PSNR_CAP_DB
    nan = ref.video.clone()
    nan[2, 1, 3, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN quality"):
        compare(Generation(nan, ref.latents), ref)
    with pytest.raises(ValueError, match="shape"):
        compare(Generation(_video(1, frames=4), ref.latents), ref)


def test_lpips_is_skipped_with_a_reason_without_local_weights(capsys):
    ok, why = lpips_available()
    ref = Generation(_video(2), torch.ones(2))
    q = compare(Generation(_video(3), torch.ones(2)), ref)
    if ok:
        assert q["lpips"] is not None and q["lpips"] > 0
    else:
        assert q["lpips"] is None and "LPIPS skipped" in why


def test_reference_cache_generates_once_and_keys_on_settings(tmp_path):
    from sixbit_tune.models.specs import load_pipeline

    pipe = load_pipeline("tiny:wan")
    cache = ReferenceCache(tmp_path / "references", {"spec": "tiny:wan"})
    s = GenerationSettings.for_model("tiny:wan", {"steps": 2})
    assert (s.height, s.width, s.num_frames, s.max_sequence_length) == (16, 16, 9, 16)
    first = cache.get(pipe, "a red square", 0, s)
    files = list((tmp_path / "references").glob("*.pt"))
    assert len(files) == 1
    with torch.no_grad():  # a changed model would give another video; the cache must not regenerate
        pipe.transformer.proj_out.bias.add_(1.0)
    again = cache.get(pipe, "a red square", 0, s)
    assert torch.equal(first.video, again.video) and torch.equal(first.latents, again.latents)
    cache.get(pipe, "a red square", 0, GenerationSettings.for_model("tiny:wan", {"steps": 3}))
    cache.get(pipe, "a red square", 1, s)
    assert len(list((tmp_path / "references").glob("*.pt"))) == 3
    assert first.video.shape == (9, 3, 16, 16) and 0.0 <= float(first.video.min()) <= float(first.video.max()) <= 1.0


def test_generation_settings_validate():
    with pytest.raises(ValueError, match="steps"):
        GenerationSettings(steps=0)
    with pytest.raises(ValueError, match="guidance"):
        GenerationSettings(guidance_scale=float("nan"))
    assert GenerationSettings(steps=3).call_kwargs() == {"num_inference_steps": 3}
