"""Tokenizers: a tokenizer.json trained in the test with `tokenizers`, and the byte fallback."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFLibTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from models.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

SENTENCES = [
    "experts are sharded over a device mesh",
    "when a device fails the coordinator builds a smaller mesh",
    "nothing a client sent is lost",
    "greedy output is the same as if nothing had failed",
]


@pytest.fixture(scope="module")
def bpe_json() -> str:
    tokenizer = HFLibTokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["[UNK]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(SENTENCES, trainer)
    return tokenizer.to_str()


def test_hf_tokenizer_round_trip(bpe_json, tmp_path):
    (tmp_path / "tokenizer.json").write_text(bpe_json)
    tokenizer = load_tokenizer(tmp_path, vocab_size=1000)
    assert isinstance(tokenizer, HFTokenizer) and isinstance(tokenizer, Tokenizer)
    assert 256 < tokenizer.vocab_size <= 300
    for text in SENTENCES + ["an unseen sentence, with punctuation!", "héllo wörld ✓"]:
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text
    # Trained merges make seen text shorter than its bytes.
    assert len(tokenizer.encode(SENTENCES[0])) < len(SENTENCES[0].encode())


def test_tokenizer_larger_than_the_model_is_refused(bpe_json, tmp_path):
    (tmp_path / "tokenizer.json").write_text(bpe_json)
    with pytest.raises(ValueError, match="vocab_size is 100"):
        load_tokenizer(tmp_path, vocab_size=100)


def test_byte_fallback_when_there_is_no_tokenizer_json(tmp_path):
    assert isinstance(load_tokenizer(None, 256), ByteTokenizer)
    tokenizer = load_tokenizer(tmp_path, 512)
    assert isinstance(tokenizer, ByteTokenizer) and tokenizer.vocab_size == 512
    assert isinstance(tokenizer, Tokenizer)


def test_byte_tokenizer_round_trip_and_odd_ids():
    tokenizer = ByteTokenizer(1000)
    text = "naïve café ✓ 日本"
    assert tokenizer.encode(text) == list(text.encode("utf-8"))
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode([104, 105, 700, 33]) == "hi\ufffd!"  # ids >= 256: placeholder
    assert tokenizer.decode([0xE2, 0x9C]) == "\ufffd"  # cut-off UTF-8: replacement character
    assert ByteTokenizer(300, placeholder="").decode([65, 299, 66]) == "AB"


def test_byte_tokenizer_with_a_small_vocab_refuses_bytes_it_cannot_hold():
    tokenizer = ByteTokenizer(160)
    assert tokenizer.encode("abc") == [97, 98, 99]
    with pytest.raises(ValueError, match="160"):
        tokenizer.encode("é")
