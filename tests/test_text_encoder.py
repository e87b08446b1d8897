"""umT5 wrapper: cleaning, tokenization contract, zeroed padding rows, checkpoint formats, and numerics against
an independent encoder written from SPEC §4.2 on the Wan-format state dict."""
import io
import math
import random

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoTokenizer, T5Tokenizer

from turbovid.config import TINY_TEXT, TextEncoderConfig
from turbovid.loading import CheckpointError, load_text_encoder, load_tokenizer, wan_t5_to_hf
from turbovid.models.text_encoder import clean_prompt, make_umt5

PROMPTS = ["a quick brown fox jumps over the lazy dog in the park at night",
           "  red   car\n\tfast  ",
           "close up shot of a bird flying over the city street in the rain on a blue day with people"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A tiny umT5-like SentencePiece model (pad 0, eos 1, unk 2, no bos) as spiece.model, plus a HF
    tokenizer.json folder with the same pieces."""
    rng = random.Random(0)
    syllables = [a + b for a in "bcdfgklmnprstvz" for b in "aeiou"]
    words = ("a the cat dog fox runs jumps over lazy quick brown red blue green video of in on park street city "
             "night day rain bird car fast slow camera shot close up people flying with at").split()
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(150)]
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(600)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=200, pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1, model_type="unigram", character_coverage=1.0,
                                   hard_vocab_limit=False, minloglevel=2)
    root = tmp_path_factory.mktemp("tok")
    (root / "spiece.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(root / "spiece.model"))
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1) and sp.get_piece_size() > 150
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    T5Tokenizer(vocab=pieces, extra_ids=0).save_pretrained(str(root / "hf"))
    return root


def wan_state(cfg: TextEncoderConfig, seed=0) -> dict[str, torch.Tensor]:
    """Random weights under the official Wan key names (SPEC §4.3), scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return torch.randn(shape, generator=g) * std

    inner = cfg.num_heads * cfg.d_kv
    state = {"token_embedding.weight": rand(cfg.vocab_size, cfg.d_model),
             "norm.weight": 1 + rand(cfg.d_model, std=0.1)}
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        state[p + "norm1.weight"] = 1 + rand(cfg.d_model, std=0.1)
        for n in "qkv":
            state[p + f"attn.{n}.weight"] = rand(inner, cfg.d_model, std=cfg.d_model ** -0.5)
        state[p + "attn.o.weight"] = rand(cfg.d_model, inner, std=inner ** -0.5)
        state[p + "pos_embedding.embedding.weight"] = rand(cfg.relative_attention_num_buckets, cfg.num_heads)
        state[p + "norm2.weight"] = 1 + rand(cfg.d_model, std=0.1)
        state[p + "ffn.gate.0.weight"] = rand(cfg.d_ff, cfg.d_model, std=cfg.d_model ** -0.5)
        state[p + "ffn.fc1.weight"] = rand(cfg.d_ff, cfg.d_model, std=cfg.d_model ** -0.5)
        state[p + "ffn.fc2.weight"] = rand(cfg.d_model, cfg.d_ff, std=cfg.d_ff ** -0.5)
    return state


# ---- independent reference, straight from SPEC §4.2 -----------------------------------------------

def ref_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 bucket of (key position - query position); the log in fp32 as in Wan's code."""
    half = num_buckets // 2
    exact = half // 2
    n = rel.abs()
    large = exact + (torch.log(n.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    return (rel > 0).long() * half + torch.where(n < exact, n, large.clamp(max=half - 1))


def ref_encoder(state, ids, mask, cfg: TextEncoderConfig, dtype) -> torch.Tensor:
    w = {k: v.to(dtype) for k, v in state.items()}
    B, L = ids.shape
    H, D = cfg.num_heads, cfg.d_kv

    def rms(x, weight):  # fp32 statistics, result cast to the model dtype, then the weight
        return weight * (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)

    pos = torch.arange(L)
    buckets = ref_bucket(pos[None, :] - pos[:, None], cfg.relative_attention_num_buckets,
                         cfg.relative_attention_max_distance)                       # [Lq, Lk]
    x = w["token_embedding.weight"][ids]                                             # [B, L, d]
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        h = rms(x, w[p + "norm1.weight"])
        q, k, v = (F.linear(h, w[p + f"attn.{n}.weight"]).view(B, L, H, D) for n in "qkv")
        bias = w[p + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)[None]  # [1, H, Lq, Lk]
        bias = bias.expand(B, H, L, L).masked_fill(mask[:, None, None, :] == 0, torch.finfo(dtype).min)
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) + bias                          # no 1/sqrt(d) scale
        probs = logits.float().softmax(-1).to(dtype)
        o = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, L, H * D)
        x = x + F.linear(o, w[p + "attn.o.weight"])
        h = rms(x, w[p + "norm2.weight"])
        gated = F.linear(h, w[p + "ffn.fc1.weight"]) * F.gelu(F.linear(h, w[p + "ffn.gate.0.weight"]),
                                                                approximate="tanh")
        x = x + F.linear(gated, w[p + "ffn.fc2.weight"])
    x = rms(x, w["norm.weight"])
    return x.masked_fill(mask[..., None] == 0, 0.0)


# ---- cleaning and tokenization ----------------------------------------------------------------------

@pytest.mark.parametrize("raw,clean", [
    ("  a   cat\n\tsits  ", "a cat sits"),
    ("Tom &amp;amp; Jerry", "Tom & Jerry"),        # unescaped twice
    ("&lt;b&gt;bold&lt;/b&gt;", "<b>bold</b>"),
    ("a\u00a0b\u3000c", "a b c"),                   # non-breaking and ideographic spaces are whitespace
    ("色调艳丽，过曝", "色调艳丽,过曝"),             # ftfy folds full-width punctuation, as the official cleaning
    ("Ã©tÃ©", "été"),                                # ftfy repairs mojibake
    ("", ""),
])
def test_clean_prompt(raw, clean):
    import ftfy  # noqa: F401  (a package dependency: the official cleaning needs it)

    assert clean_prompt(raw) == clean


def test_clean_prompt_refuses_without_ftfy(monkeypatch):
    # No silent fallback: without ftfy the Wan negative prompt's full-width commas stay and tokenize differently.
    import turbovid.models.text_encoder as te

    monkeypatch.setattr(te, "ftfy", None)
    with pytest.raises(ImportError, match="ftfy"):
        te.clean_prompt("色调艳丽，过曝")


def test_tokenizer_contract_and_both_formats(tok_dir):
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "spiece.model"))
    official = AutoTokenizer.from_pretrained(str(tok_dir / "hf"), local_files_only=True)
    texts = [clean_prompt(p) for p in PROMPTS] + [" ".join(["quick brown fox"] * 20)]
    L = 16
    results = [load_tokenizer(tok_dir)(texts, L), load_tokenizer(tok_dir / "spiece.model")(texts, L),
               load_tokenizer(tok_dir / "hf")(texts, L)]
    # The official call (padding to max_length with truncation and EOS) as the reference.
    ref = official(texts, padding="max_length", max_length=L, truncation=True, add_special_tokens=True,
                   return_tensors="pt")
    for ids, mask in results:
        assert ids.dtype == mask.dtype == torch.long and ids.shape == (len(texts), L)
        assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    ids, mask = results[0]
    for b, text in enumerate(texts):  # by hand from the SentencePiece pieces: content + EOS + pad
        row = sp.encode(text)[: L - 1] + [1]
        pad = L - len(row)
        assert ids[b].tolist() == row + [0] * pad and mask[b].tolist() == [1] * len(row) + [0] * pad
    assert mask[-1].all() and ids[-1, -1] == 1  # truncated: EOS kept in the last slot


def test_tokenizer_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no umT5 tokenizer"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "spiece.model").write_bytes(b"not a model")
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)


# ---- the encoder ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def state():
    return wan_state(TINY_TEXT)


def test_padding_rows_are_exact_zeros(tok_dir, state):
    enc = load_text_encoder(state, tok_dir, TINY_TEXT, dtype=torch.float32)
    out = enc.encode(PROMPTS)
    assert out.shape == (3, TINY_TEXT.text_len, TINY_TEXT.d_model) and out.dtype == torch.float32
    _, mask = enc.tokenize(PROMPTS)
    lengths = mask.sum(1).tolist()
    assert lengths[1] < lengths[0] <= TINY_TEXT.text_len  # a short prompt and a (possibly) truncated one
    for b, n in enumerate(lengths):
        assert (out[b, n:] == 0).all() and (out[b, :n].abs().sum(-1) > 0).all()
    # Padded keys are masked: a prompt encodes the same alone or in a batch with longer ones.
    alone = enc.encode([PROMPTS[1]])
    assert torch.allclose(alone[0], out[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wrapper_matches_spec_reference(tok_dir, state, dtype):
    enc = load_text_encoder(state, tok_dir, TINY_TEXT, dtype=dtype)
    ids, mask = enc.tokenize(PROMPTS)
    out = enc.encode(PROMPTS)
    assert out.dtype == dtype
    ref32 = ref_encoder(state, ids, mask, TINY_TEXT, torch.float32)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref32, rtol=1e-5, atol=1e-5)
    else:
        ref16 = ref_encoder(state, ids, mask, TINY_TEXT, torch.bfloat16)
        # Same rounding points as the SPEC reference (bit-identical on CPU): nearly every element equal. HF's
        # default "gelu_new", evaluated op by op in bf16, leaves only about half of them equal.
        assert (out == ref16).float().mean() >= 0.95
        torch.testing.assert_close(out.float(), ref16.float(), rtol=2e-2, atol=2e-2)
        err, ref_err = (out.float() - ref32).abs().mean(), (ref16.float() - ref32).abs().mean()
        assert err <= 1.25 * ref_err + 1e-6


def test_long_sequences_cover_log_buckets(tok_dir, state):
    # Relative distances beyond 8 (log buckets) and beyond max_distance 128 (the last bucket), with a
    # ragged mask; the model runs on ids directly since the tiny text_len is only 16.
    enc = load_text_encoder(state, tok_dir, TINY_TEXT, dtype=torch.float32)
    L = 150
    ids = torch.randint(3, TINY_TEXT.vocab_size, (2, L), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, 97:] = 0
    with torch.no_grad():
        out = enc.model(input_ids=ids, attention_mask=mask).last_hidden_state.masked_fill(mask[..., None] == 0, 0)
    torch.testing.assert_close(out, ref_encoder(state, ids, mask, TINY_TEXT, torch.float32), rtol=1e-5, atol=1e-5)
    assert ref_bucket(torch.tensor([-200, -128, -16, -8, -7, 0, 7, 8, 16, 127, 200]), 32, 128).tolist() == \
        [15, 15, 10, 8, 7, 0, 23, 24, 26, 31, 31]


def test_gate_and_fc1_are_not_interchangeable(tok_dir, state):
    # The reference test above would catch a gate <-> fc1 swap in the mapping: the swapped model differs.
    swapped = dict(state)
    for i in range(TINY_TEXT.num_layers):
        p = f"blocks.{i}.ffn."
        swapped[p + "gate.0.weight"], swapped[p + "fc1.weight"] = state[p + "fc1.weight"], state[p + "gate.0.weight"]
    a = load_text_encoder(state, tok_dir, TINY_TEXT, dtype=torch.float32).encode(PROMPTS[:1])
    b = load_text_encoder(swapped, tok_dir, TINY_TEXT, dtype=torch.float32).encode(PROMPTS[:1])
    assert (a - b).abs().max() > 1e-2


def test_wan_pth_and_hf_folder_give_identical_outputs(tmp_path, tok_dir, state):
    bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
    pth = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(bf16, pth)
    hf = wan_t5_to_hf(bf16)
    assert hf["shared.weight"] is hf["encoder.embed_tokens.weight"] is bf16["token_embedding.weight"]
    assert hf["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"] is bf16["blocks.1.ffn.gate.0.weight"]
    assert hf["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"] is bf16["blocks.1.ffn.fc1.weight"]
    assert len(hf) == len(bf16) + 1
    folder = tmp_path / "umt5_hf"
    folder.mkdir()
    # HF saves the tied embedding once; a full encoder-decoder file also has decoder keys the encoder ignores.
    to_save = {k: v for k, v in hf.items() if k != "encoder.embed_tokens.weight"}
    to_save["decoder.final_layer_norm.weight"] = torch.ones(TINY_TEXT.d_model, dtype=torch.bfloat16)
    save_file(to_save, str(folder / "model.safetensors"))

    from_pth = load_text_encoder(pth, tok_dir / "spiece.model", TINY_TEXT)
    from_hf = load_text_encoder(folder, tok_dir / "hf", TINY_TEXT)
    assert from_pth.dtype == torch.bfloat16
    assert from_pth.model.encoder.embed_tokens.weight is from_pth.model.shared.weight  # still tied after loading
    a, b = from_pth.encode(PROMPTS), from_hf.encode(PROMPTS)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    from_pth.free()
    with pytest.raises(RuntimeError, match="freed"):
        from_pth.encode(PROMPTS)


def test_wrong_checkpoints_are_one_line_errors(tmp_path, tok_dir, state):
    dit_like = {"patch_embedding.weight": torch.zeros(4, 4), "blocks.0.self_attn.q.weight": torch.zeros(4, 4)}
    with pytest.raises(CheckpointError, match="umT5") as e:
        load_text_encoder(dit_like, tok_dir, TINY_TEXT)
    assert "\n" not in str(e.value)
    other = TextEncoderConfig(vocab_size=512, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, text_len=16)
    with pytest.raises(CheckpointError, match="shape") as e:
        load_text_encoder(state, tok_dir, other)
    assert "\n" not in str(e.value)
    fewer = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    with pytest.raises(CheckpointError, match="missing"):
        load_text_encoder(fewer, tok_dir, TINY_TEXT)
    with pytest.raises(CheckpointError, match="not found"):
        load_text_encoder(tmp_path / "nope.pth", tok_dir, TINY_TEXT)
    small_vocab = TextEncoderConfig(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, text_len=16)
    with pytest.raises(CheckpointError, match="tokenizer has"):
        load_text_encoder(wan_state(small_vocab), tok_dir, small_vocab)


def test_full_size_mapping_matches_spec_table():
    # SPEC §4.3: 242 Wan tensors, 5,680,910,336 parameters; shapes from the table, built on the meta device.
    cfg = TextEncoderConfig()
    d, f = cfg.d_model, cfg.d_ff
    shapes = {"token_embedding.weight": (256384, d), "norm.weight": (d,)}
    for i in range(24):
        p = f"blocks.{i}."
        shapes.update({p + "norm1.weight": (d,), p + "norm2.weight": (d,),
                       p + "pos_embedding.embedding.weight": (32, 64), p + "ffn.gate.0.weight": (f, d),
                       p + "ffn.fc1.weight": (f, d), p + "ffn.fc2.weight": (d, f)})
        shapes.update({p + f"attn.{n}.weight": (d, d) for n in "qkvo"})
    wan = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert len(wan) == 242 and sum(v.numel() for v in wan.values()) == 5_680_910_336
    with torch.device("meta"):
        expected = make_umt5(cfg).state_dict()
    hf = wan_t5_to_hf(wan)
    assert set(hf) == set(expected)
    assert all(hf[k].shape == expected[k].shape for k in hf)
