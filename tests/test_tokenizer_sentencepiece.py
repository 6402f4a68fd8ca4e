"""Native checkpoints ship a SentencePiece `tokenizer.model`; the build converts it once into `tokenizer.json`.

A small SentencePiece BPE model is trained here, offline, with the options Mistral's tokenizers use (BPE, byte
fallback, digits split, no whitespace normalization, dummy prefix), and the converted tokenizer must give the same
ids and the same decoded text as sentencepiece itself on varied text.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import sentencepiece as spm

from mistral_export.errors import MistralExportError
from mistral_export.model.tokenizer import (
    TextTokenizer,
    load_tokenizer,
    tokenizer_from_sentencepiece,
    write_tokenizer_json,
)

from conftest import train_sentencepiece

SAMPLES = [
    "def read_config(path):\n    return json.loads(path.read_text())",
    "Hello world",
    " leading space and trailing space ",
    "many    spaces\t\ttabs\n\n\nnewlines",
    "digits 1234567890 and 3.14159 and 2026-11-30",
    "unicode: café naïve Ærøskøbing — “quotes” ½",
    "cjk 中文字符 and emoji 🙂🚀 (byte fallback)",
    "mixed\u00a0nbsp and zero\u200bwidth",
    "",
    "    indented\n        more indented\n",
    "a",
    "▁already escaped▁",
]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def sentencepiece_model(request, tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp(f"spm-{request.param}") / "tokenizer.model", request.param)


@pytest.mark.parametrize("text", SAMPLES)
def test_converted_tokenizer_matches_sentencepiece(sentencepiece_model, text):
    reference = spm.SentencePieceProcessor(model_file=str(sentencepiece_model))
    converted = tokenizer_from_sentencepiece(sentencepiece_model)
    expected = reference.encode(text)
    assert converted.encode(text, add_special_tokens=False).ids == expected
    assert converted.decode(expected) == reference.decode(expected)


def test_byte_fallback_is_exercised(sentencepiece_model):
    reference = spm.SentencePieceProcessor(model_file=str(sentencepiece_model))
    pieces = reference.encode("🙂", out_type=str)
    assert any(p.startswith("<0x") for p in pieces), pieces  # otherwise the emoji samples prove nothing


def test_build_folder_tokenizer_json_round_trip(sentencepiece_model, tmp_path):
    """What the build writes (tokenizer.json) loads with the `tokenizers` library alone and keeps BOS/EOS."""
    target = tmp_path / "tokenizer.json"
    write_tokenizer_json(sentencepiece_model, target)
    assert json.loads(target.read_text())["model"]["type"] in ("BPE", "Unigram")
    from_json, from_model = load_tokenizer(tmp_path), load_tokenizer(sentencepiece_model.parent)
    reference = spm.SentencePieceProcessor(model_file=str(sentencepiece_model))
    text = textwrap.dedent(SAMPLES[0])
    assert from_json.encode(text) == from_model.encode(text) == [reference.bos_id(), *reference.encode(text)]
    assert (from_json.bos_id, from_json.eos_id) == (reference.bos_id(), reference.eos_id())
    assert isinstance(from_json, TextTokenizer) and from_json.vocab_size == reference.vocab_size()


def test_not_a_sentencepiece_model(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\xff\x00 definitely not a protobuf")
    with pytest.raises(MistralExportError, match="tokenizer.model: not a SentencePiece model"):
        load_tokenizer(tmp_path)


def test_tekken_is_refused_with_a_message(tmp_path):
    (tmp_path / "tekken.json").write_text("{}")
    with pytest.raises(MistralExportError, match="tekken.json: .*not supported yet"):
        load_tokenizer(tmp_path)
