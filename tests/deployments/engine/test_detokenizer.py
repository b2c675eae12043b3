from __future__ import annotations

import pytest

from deployments.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from deployments.model_loader import build_tiny_random_model, load_model
from deployments.model_registry import ModelConfig

TEXT = "Hi 😀 世界, ça va? spaces  kept "


def test_multibyte_characters_stream_whole_and_the_text_adds_up():
    _, tokenizer = build_tiny_random_model()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(TEXT.encode())  # byte-level: the emoji alone is four tokens
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.add(i) for i in ids]
    deltas.append(detokenizer.flush())
    assert "".join(deltas) == TEXT == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in d for d in deltas)
    assert "😀" in deltas and "世" in deltas  # emitted as soon as their last byte arrives


def test_special_tokens_are_skipped_and_a_cut_character_is_flushed_like_decode():
    _, tokenizer = build_tiny_random_model()
    ids = tokenizer("ok 世", add_special_tokens=False)["input_ids"][:-1] + [tokenizer.eos_token_id]
    detokenizer = IncrementalDetokenizer(tokenizer)
    text = "".join(detokenizer.add(i) for i in ids) + detokenizer.flush()
    assert text == tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_string_split_across_deltas_is_held_back_then_cut():
    matcher = StopStringMatcher(("END", "###"))
    shown = [matcher.feed(d) for d in ["abc E", "N", "x #", "#", "#tail"]]
    assert shown == ["abc ", "", "ENx ", "", ""]
    assert matcher.is_stopped


def test_held_text_is_released_when_the_stream_ends_without_a_stop():
    matcher = StopStringMatcher(("END",))
    assert matcher.feed("the EN") == "the "
    assert matcher.flush() == "EN"
    assert not matcher.is_stopped


@pytest.mark.slow
def test_smollm2_tokenizer_streams_emoji_cjk_and_spaces_intact():
    tokenizer = load_model(ModelConfig(name="smol")).tokenizer
    text = "Hi 😀 世界, ça va?  spaces   kept\n\nflag 🇫🇷 end"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.add(i) for i in ids] + [detokenizer.flush()]
    assert "".join(deltas) == text == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in d for d in deltas)
