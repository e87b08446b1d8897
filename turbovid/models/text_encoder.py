"""umT5-xxl text encoder: a thin wrapper over transformers' `UMT5EncoderModel` (SPEC §4).

prompt -> clean_prompt -> ids [B, L] + mask (EOS appended, right-padded to L = text_len)
       -> UMT5EncoderModel(ids, mask) -> [B, L, d_model] -> rows at and after the real length zeroed.

The HF module already computes what Wan's own T5 computes (no 1/sqrt(d) attention scale, T5 RMSNorm with
fp32 statistics, per-layer bidirectional relative position bias, gated GELU with gate <-> wi_0). Two choices
below keep its bf16 rounding points those of SPEC §4.2 (bit-identical to the reference in the tests, on CPU):
- the GELU is "gelu_pytorch_tanh" (one fused tanh-GELU, like Wan's nn.GELU(approximate="tanh")) instead of
  UMT5's default "gelu_new", which evaluates the tanh formula op by op in bf16;
- attention is "eager": q.k^T is rounded to bf16 before the bias is added and the softmax runs in fp32, as in
  Wan; SDPA would keep the logits in fp32.
Weights are loaded by `turbovid.loading.load_text_encoder`; tokenizers by `turbovid.loading.load_tokenizer`.
"""
from __future__ import annotations

import gc
import html
import re
from collections.abc import Callable

import torch
from transformers import UMT5Config, UMT5EncoderModel

from turbovid.config import TextEncoderConfig

try:  # a dependency of the package; optional here only so that environments without it can import the module
    import ftfy
except ImportError:
    ftfy = None


def clean_prompt(text: str) -> str:
    """SPEC §4.1 "whitespace" cleaning: ftfy, HTML-unescape twice, strip, collapse whitespace runs.

    Without ftfy there is no cleaning at all, never a silent fallback: ftfy maps full-width punctuation to
    ASCII, so the Wan negative prompt tokenizes differently without it (the mini teacher's rounds 1-3 ran on a
    GPU box without ftfy and learned CFG's unconditional branch on those tokens; docs/training/mini/README.md)."""
    if ftfy is None:
        raise ModuleNotFoundError("prompt cleaning needs ftfy (pip install ftfy): without it prompts tokenize "
                                  "differently", name="ftfy")
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class Tokenizer:
    """Cleaned prompts -> (ids [B, L] int64, mask [B, L] int64), the way the HF T5 tokenizer is called
    officially (add_special_tokens, truncation, padding="max_length"): content ids cut to L-1, then EOS, then
    pad ids. `encode` maps one string to its content ids without special tokens; see `load_tokenizer`."""

    def __init__(self, encode: Callable[[str], list[int]], pad_id: int, eos_id: int, vocab_size: int):
        self.encode, self.pad_id, self.eos_id, self.vocab_size = encode, pad_id, eos_id, vocab_size

    def __call__(self, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), length), dtype=torch.long)
        for b, text in enumerate(texts):
            row = self.encode(text)[: length - 1] + [self.eos_id]
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[b, : len(row)] = 1
        return ids, mask


def umt5_config(cfg: TextEncoderConfig) -> UMT5Config:
    return UMT5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        feed_forward_proj="gated-gelu_pytorch_tanh",  # fused tanh GELU, see the module docstring
        layer_norm_epsilon=1e-6, dropout_rate=0.0, attn_implementation="eager",
        is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1)


def make_umt5(cfg: TextEncoderConfig) -> UMT5EncoderModel:
    """An umT5 encoder with untrained weights on the current default device (build under
    `torch.device("meta")` and assign-load a state dict to avoid allocating the 5.7B parameters twice)."""
    return UMT5EncoderModel(umt5_config(cfg)).eval().requires_grad_(False)


class TextEncoder:
    def __init__(self, model: UMT5EncoderModel, tokenizer: Tokenizer, text_len: int):
        self.model: UMT5EncoderModel | None = model
        self.tokenizer = tokenizer
        self.text_len = text_len

    @property
    def device(self) -> torch.device:
        return self._model().shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._model().shared.weight.dtype

    def _model(self) -> UMT5EncoderModel:
        if self.model is None:
            raise RuntimeError("the text encoder was freed; load it again to encode prompts")
        return self.model

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer([clean_prompt(p) for p in prompts], self.text_len)

    @torch.no_grad()  # not inference_mode: training saves these embeddings for backward through the DiT
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """[B, text_len, d_model] in the model dtype; rows at and after each prompt's EOS+1 are exact zeros."""
        model = self._model()
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        # Padded rows attended to the real tokens and are not zero; the DiT cross-attention does not mask them,
        # so they must be exactly zero (SPEC §4.2, §13.8).
        return out.masked_fill(mask[..., None] == 0, 0.0)

    def to(self, device: str | torch.device) -> TextEncoder:
        self._model().to(device)
        return self

    def free(self) -> None:
        """Drop the weights (the inference scripts encode once, then free the encoder, SPEC §4.2)."""
        on_cuda = self.model is not None and self.device.type == "cuda"
        self.model = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
