"""A prompt the reference model cannot read fully is named in a warning; prompts of its grammar pass silently."""

from __future__ import annotations

import warnings

import pytest

from sixbit_tune.models.reference import data, load_reference_pipeline
from sixbit_tune.models.reference.pipeline import UnknownWordsWarning, unknown_words


@pytest.fixture(scope="module")
def pipe():
    p = load_reference_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def _ours(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, UnknownWordsWarning)]


def test_unknown_words_of_a_prompt(pipe):
    tok = pipe.tokenizer
    assert unknown_words(tok, "a red square moving left on a striped background") == []
    assert unknown_words(tok, "A RED Square") == []
    assert unknown_words(tok, "a purple hexagon moving left.") == ["purple", "hexagon", "left."]
    assert unknown_words(tok, "purple purple") == ["purple"]
    assert all(unknown_words(tok, w) == [] for w in data.vocabulary())


def test_generation_with_unknown_words_warns_naming_them(pipe):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = pipe("a purple hexagon moving left", num_inference_steps=1, num_frames=2, height=8, width=8,
                   output_type="latent").frames
    assert out.shape[0] == 1  # it still generates: the warning does not stop the pipeline
    messages = _ours(record)
    assert len(messages) == 1
    assert "['purple', 'hexagon']" in messages[0] and "a purple hexagon moving left" in messages[0]


def test_prompts_of_the_grammar_and_the_empty_negative_prompt_do_not_warn(pipe):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for prompt in data.all_prompts()[:5]:
            pipe.encode_prompt(prompt, do_classifier_free_guidance=True)
    assert _ours(record) == []


def test_a_prompt_longer_than_the_model_reads_warns(pipe):
    long = " ".join(["a red square"] * 8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pipe.encode_prompt(long, do_classifier_free_guidance=False)
    messages = _ours(record)
    assert len(messages) == 1 and "reads only 16" in messages[0]
