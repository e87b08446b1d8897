"""The embedded model's SentencePiece tokenizer, trained on the procedural captions.

umT5's special ids are kept (pad 0, EOS 1, unk 2, no BOS), so `turbovid.loading.load_tokenizer` and the
umT5 wrapper treat it like the real `spiece.model`. BPE with 512 pieces: every caption word becomes a
single piece (captions are <= 19 pieces + EOS, within the 32-token text length of the mini model);
byte fallback encodes anything else (the Chinese Wan negative prompt) without <unk>. umT5 itself is a
unigram model; unigram on this tiny corpus splits words into letters, which helps nobody.

`build_spiece` is deterministic: same corpus (train captions of seed 0), one thread, no sampling, so
rebuilding gives the shipped file byte for byte (tested).
"""
from __future__ import annotations

import io
from pathlib import Path

from turbovid.train.data import all_captions

ASSET = Path(__file__).resolve().parent.parent / "assets" / "mini" / "spiece.model"
VOCAB_SIZE = 512          # = TextEncoderConfig.vocab_size of the mini (and tiny) text encoder
CORPUS_CAPTIONS = 5000    # train-split captions of seed 0; the held-out split uses the same words


def train_spiece(captions: list[str], vocab_size: int = VOCAB_SIZE) -> bytes:
    """Serialized SentencePiece model trained on `captions`."""
    import sentencepiece as spm

    if not captions:
        raise ValueError("train_spiece needs at least one caption")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity",   # no NFKC table: keeps the file a few KB
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
    return model.getvalue()


def build_spiece(path: str | Path = ASSET, vocab_size: int = VOCAB_SIZE, seed: int = 0,
                 count: int = CORPUS_CAPTIONS) -> Path:
    """(Re)build the tokenizer file from the procedural captions; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = train_spiece(all_captions(seed, "train", count), vocab_size)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path
