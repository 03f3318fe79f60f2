"""SageModel: InternViT + adapter + Llama with Self-Guided Fact Enhancement (paper §3.2, Fig. 2).

One forward pass (docs/design.md §1):
  1. encode_images: InternViT -> drop CLS -> pixel shuffle -> adapter        v (tiles, T, C)
  2. Eq. 1: top-K test tokens least similar to the reference          idx, j* (B, K)
  3. facts: token embedding table + masked mean pooling (F_t)          t^g (B, N, C)
  4. Eq. 2: fusion cross-attention (keys v_d, values v_t[idx])         t^s (B, N, C)
  5. Eq. 9: LayerNorm projection head                                  phi_Proj(t^s)
  6. assembly: v at <IMG_CONTEXT>, phi_Proj(t^s) at <FACT_CONTEXT>    inputs_embeds (B, T, C)
  7. LLM: logits, Eq. 8 answer cross-entropy; generation (Eq. 10) with the KV cache.
Zero-shot (no reference): keys = values = all test tokens. facts_mode "hard"/"none" skip 2-5.

    model = SageModel.from_pretrained("weights/sage-tiny-base")   # = sage.load_pretrained
    print(sage.inference.chat(model, img, "Any defect?"))
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.nn as nn

from sage.checkpoint import check_config_metadata, load_into
from sage.config import SageConfig
from sage.kernels import topk_cosine
from sage.losses import IGNORE_INDEX, sequence_logprobs
from sage.models.adapter import Adapter, pixel_shuffle
from sage.models.decoding import StaticDecoder
from sage.models.feature_cache import FeatureCache
from sage.models.fusion import (FactProjection, FusionAttention, difference_features,
                                 gather_tokens)
from sage.models.intern_vit import InternViT
from sage.models.llama import Llama
from sage.names import INTERNVL_KEY_MAP, PLAIN_VLM_KEY_MAP
from sage.safetensors_io import checkpoint_dtype, read_checkpoint_index
from sage.tokenizer import Tokenizer


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Global pooling of fact token embeddings (paper §3.2): x (..., L, C), mask (..., L)
    -> (..., C). Accumulates in fp32; an all-pad sentence pools to zeros instead of NaN.
    """
    m = mask.to(torch.float32).unsqueeze(-1)  # (..., L, 1)
    total = (x.float() * m).sum(-2)  # (..., C)
    return (total / m.sum(-2).clamp_min(1.0)).to(x.dtype)


def split_by_tiles(v: torch.Tensor, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image token sets from per-tile features.

    v (n_tiles, T, C) for all tiles of all images in order, tiles (B,) tiles per image ->
    padded (B, P_max, C) with P_b = tiles_b * T, and mask (B, P_max) bool (True = real token).
    """
    n, T, C = v.shape
    counts = [int(t) * T for t in tiles.tolist()]
    if sum(counts) != n * T:
        raise ValueError(f"tiles per image {tiles.tolist()} sum to {sum(tiles.tolist())}, "
                         f"but {n} tiles were encoded")
    flat = v.reshape(n * T, C)  # (n_tiles * T, C), image-major order
    if len(set(counts)) == 1:  # common case: every image has the same number of tiles
        B = len(counts)
        return flat.view(B, counts[0], C), torch.ones(B, counts[0], dtype=torch.bool,
                                                      device=v.device)
    parts = torch.split(flat, counts)
    padded = nn.utils.rnn.pad_sequence(list(parts), batch_first=True)  # (B, P_max, C)
    mask = torch.zeros(padded.shape[:2], dtype=torch.bool, device=v.device)
    for b, c in enumerate(counts):
        mask[b, :c] = True
    return padded, mask


DECODES = ("eager", "static", "graph")  # SageModel.generate(decode=...)


class SageModel(nn.Module):
    """The full VLM of Fig. 2 (InternVL2 layout) plus SAGE's fusion attention and head."""

    def __init__(self, cfg: SageConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = InternViT(cfg.vision)
        self.adapter = Adapter(cfg.adapter_in_dim, cfg.llm.dim, norm_eps=cfg.adapter_norm_eps)
        self.llm = Llama(cfg.llm)
        # SAGE's modules exist only where they are used: a plain VLM (a plain InternVL2
        # directory, facts_mode "none") or facts as text ("hard") has none (issue 15)
        fe = cfg.facts_mode == "fe"
        self.fusion = FusionAttention(cfg.llm.dim, cfg.fusion_heads, norm=cfg.fusion_norm,
                                      init=cfg.fusion_init) if fe else None
        self.fact_proj = FactProjection(cfg.llm.dim, init_std=cfg.fact_head_init) if fe else None
        self._tokenizer = None
        self.vision_cache: FeatureCache | None = None  # frozen InternViT outputs by tile
        self.static_decoder: StaticDecoder | None = None  # generate(decode="static" / "graph")

    def init_weights(self) -> None:
        for m in (self.vision, self.adapter, self.llm, self.fusion, self.fact_proj):
            if m is not None:
                m.init_weights()

    # -------------------------------------------------------------- tokenizer

    @property
    def tokenizer(self):
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tok) -> None:
        """Attach the tokenizer; its placeholder ids are what forward looks for."""
        self._tokenizer = tok

    def _special_ids(self) -> tuple[int, int]:
        if self._tokenizer is None:
            raise ValueError("SageModel has no tokenizer: set `model.tokenizer = Tokenizer(...)` "
                             "(sage.load_pretrained attaches the checkpoint's tokenizer.model)")
        return self._tokenizer.img_context_id, self._tokenizer.fact_context_id

    # -------------------------------------------------------------- vision

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (n_tiles, 3, S, S) -> visual tokens v (n_tiles, T, C), T =
        cfg.n_image_tokens. InternViT runs without autograd when it is frozen (docs/design.md
        §2), and its output comes from self.vision_cache when one is set (a FeatureCache:
        --vision_cache_gb); the adapter always runs, with autograd.
        """
        vit_trainable = any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and vit_trainable):
            if self.vision_cache is not None and not vit_trainable:
                h = self.vision_cache(pixel_values, self.vision_features)
            else:
                h = self.vision_features(pixel_values)
        return self.adapter(h)  # (n, T, C)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """InternViT -> drop CLS -> pixel shuffle: (n_tiles, 3, S, S) -> (n_tiles, T, 4 C_vit),
        the adapter's input (what self.vision_cache keeps)."""
        h = self.vision(pixel_values.to(self.adapter.fc1.weight.dtype),
                        select_layer=self.cfg.select_layer)  # (n, 1 + P, C_vit)
        h = h[:, 1:]  # drop CLS: (n, P, C_vit)
        n, P, c = h.shape
        g = int(P**0.5)
        h = pixel_shuffle(h.reshape(n, g, g, c), self.cfg.downsample_ratio)  # (n, g/2, g/2, 4c)
        return h.flatten(1, 2)  # (n, T, 4c); also for n = 0 (FeatureCache under FSDP)

    # -------------------------------------------------------------- SFE

    def embed_facts(self, fact_ids: torch.Tensor, fact_mask: torch.Tensor) -> torch.Tensor:
        """Fact sentences -> t^g (B, N, C): the LLM's token embedding table (F_t) + mean pooling."""
        return masked_mean(self.llm.embed_tokens(fact_ids), fact_mask)  # (B, N, C)

    def select(self, v_t: torch.Tensor, v_r: torch.Tensor, t_mask: torch.Tensor,
               r_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eq. 1 on padded per-image token sets -> (idx, scores, ref_idx), each (B, K).

        Index-only (no gradient through the choice); images with tile counts that differ from
        the rest of the batch are handled one by one so padding never enters the selection.
        """
        k = self.cfg.top_k
        if bool(t_mask.all()) and bool(r_mask.all()):
            return topk_cosine(v_t.detach(), v_r.detach(), k, mode=self.cfg.selection)
        outs = []
        for b in range(v_t.shape[0]):
            p, r = int(t_mask[b].sum()), int(r_mask[b].sum())
            outs.append(topk_cosine(v_t[b:b + 1, :p].detach(), v_r[b:b + 1, :r].detach(), k,
                                    mode=self.cfg.selection))
        return tuple(torch.cat(x) for x in zip(*outs))

    def fusion_inputs(self, v_t_tiles: torch.Tensor, batch: dict
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Steps 2-3: Eq. 2's inputs -> (t^g (B, N, C), keys (B, L, C), values (B, L, C),
        key_mask (B, L) or None). One-shot: L = K keys v_d and values v_t[idx] (or v_d with
        cfg.fusion_values "difference"); zero-shot (paper §5.1): keys = values = all v_t,
        L = P test tokens (key_mask marks the real ones when tile counts differ).

        cfg.comparison "both" (a departure from Eq. 1, which looks one way): L = 2K, the K
        test patches least matched in the reference and then the K reference patches least
        matched in the test, each as test minus reference (v_t[nn] - v_r[i]; values v_t[nn]
        with fusion_values "test"), so that what the test lacks, a missing part, is seen too."""
        t_g = self.embed_facts(batch["fact_ids"], batch["fact_mask"])  # (B, N, C)
        v_t, t_mask = split_by_tiles(v_t_tiles, batch["tiles_test"])  # (B, P, C)
        if batch.get("pixel_ref") is None:
            return t_g, v_t, v_t, None if t_mask.all() else t_mask
        v_r, r_mask = split_by_tiles(self.encode_images(batch["pixel_ref"]),
                                     batch["tiles_ref"])  # (B, R, C)
        idx, _, ref_idx = self.select(v_t, v_r, t_mask, r_mask)  # (B, K) each
        v_d, v_sel = difference_features(v_t, v_r, idx, ref_idx)  # (B, K, C) each
        if self.cfg.comparison == "both":  # Eq. 1 the other way: reference patches, test nn
            r_idx, _, t_nn = self.select(v_r, v_t, r_mask, t_mask)  # (B, K) each
            v_back, _ = difference_features(v_r, v_t, r_idx, t_nn)  # v_r[i] - v_t[nn]
            v_d = torch.cat([v_d, -v_back], 1)  # (B, 2K, C), test minus reference
            v_sel = torch.cat([v_sel, gather_tokens(v_t, t_nn)], 1)  # (B, 2K, C)
        return t_g, v_d, v_d if self.cfg.fusion_values == "difference" else v_sel, None

    def fact_tokens(self, v_t_tiles: torch.Tensor, batch: dict) -> torch.Tensor:
        """Steps 2-5: the N comparison-enhanced fact tokens phi_Proj(t^s), (B, N, C)."""
        t_g, keys, values, key_mask = self.fusion_inputs(v_t_tiles, batch)
        return self.fact_proj(self.fusion(t_g, keys, values, key_mask=key_mask))  # Eq. 2, 9

    # -------------------------------------------------------------- assembly

    def assemble(self, batch: dict) -> torch.Tensor:
        """Token embeddings with image and fact embeddings at their placeholders, (B, T, C)."""
        img_id, fact_id = self._special_ids()
        ids = batch["input_ids"]
        img_pos, fact_pos = ids == img_id, ids == fact_id  # (B, T) each
        # Placeholder ids may lie outside the embedding table (<FACT_CONTEXT> is SAGE's own
        # token): look up id 0 there, the row is overwritten below anyway.
        x = self.llm.embed_tokens(ids.masked_fill(img_pos | fact_pos, 0))  # (B, T, C)
        v = self.encode_images(batch["pixel_test"])  # (n_tiles, T_img, C)
        n_img = v.shape[0] * v.shape[1]
        if int(img_pos.sum()) != n_img:
            raise ValueError(f"prompt has {int(img_pos.sum())} <IMG_CONTEXT> tokens "
                             f"(per sample {img_pos.sum(1).tolist()}) but the test images give "
                             f"{n_img} visual tokens (tiles {batch['tiles_test'].tolist()} x "
                             f"{v.shape[1]}); ids {batch.get('ids')}")
        x = x.masked_scatter(img_pos.unsqueeze(-1), v.to(x.dtype))
        n_fact = int(fact_pos.sum())
        if self.cfg.facts_mode == "fe" or n_fact:
            want = ids.shape[0] * self.cfg.n_facts
            if n_fact != want or self.cfg.facts_mode != "fe":
                raise ValueError(f"prompt has {n_fact} <FACT_CONTEXT> tokens (per sample "
                                 f"{fact_pos.sum(1).tolist()}); facts_mode "
                                 f"{self.cfg.facts_mode!r} with n_facts={self.cfg.n_facts} "
                                 f"expects {want if self.cfg.facts_mode == 'fe' else 0}")
            x = x.masked_scatter(fact_pos.unsqueeze(-1), self.fact_tokens(v, batch).to(x.dtype))
        return x

    def forward(self, batch: dict, answer_only: bool = False
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """-> logits (B, T, V), Eq. 8 answer cross-entropy summed per sequence, answer tokens
        per sequence (None, None without labels).

        A sequence is a row, or with batch["segments"] (a packed E-DPO batch: one row holds a
        prompt and several answers, sage.data.collate.EDPOCollator) each answer segment.
        answer_only: run the LM head only where the next token is an answer token and return
        logits None; training needs nothing else, and at 40B the full (B, T, 64k) logits would
        be the largest tensor of the step.
        """
        x = self.assemble(batch)
        mask, position_ids = batch["attention_mask"], batch.get("position_ids")
        # Right padding (training batches) cannot change a causal model's outputs at real
        # tokens: drop the mask so SDPA takes its fused causal path.
        if mask.dim() == 2 and bool((mask[:, 1:] <= mask[:, :-1]).all()):
            mask = None
        labels = batch.get("labels")
        if labels is None:
            return self.llm(inputs_embeds=x, attention_mask=mask, position_ids=position_ids), \
                None, None
        targets = labels[:, 1:]  # (B, T-1): logits at t predict the token at t + 1
        keep = targets != IGNORE_INDEX  # (B, T-1)
        at = torch.cat([keep, keep.new_zeros(keep.shape[0], 1)], dim=1)  # (B, T)
        logits = None
        if answer_only:
            rows = self.llm(inputs_embeds=x, attention_mask=mask, position_ids=position_ids,
                            logits_at=at)  # (N, V)
        else:
            logits = self.llm(inputs_embeds=x, attention_mask=mask, position_ids=position_ids)
            rows = logits[at]  # (N, V)
        if "segments" in batch:
            sequence, n_seq = batch["segments"][:, 1:][keep], batch["n_segments"]
        else:
            sequence, n_seq = keep.nonzero()[:, 0], labels.shape[0]
        loss_sum = -sequence_logprobs(rows, targets[keep], sequence, n_seq)  # Eq. 8 per sequence
        n_tokens = torch.zeros(n_seq, dtype=torch.long, device=labels.device).index_add(
            0, sequence, torch.ones_like(sequence))
        return logits, loss_sum, n_tokens

    # -------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, generator: torch.Generator | None = None,
                 use_cache: bool = True, decode: str = "eager") -> torch.Tensor:
        """Eq. 10: autoregressive answers for a left-padded batch -> new ids (B, n_new).
        decode: "eager" (Llama.generate), "static" (sage.models.decoding.StaticDecoder, the
        same answers with static shapes) or "graph" (that step replayed as a CUDA graph; the
        decoder is kept for the next batch of the same size)."""
        if decode not in DECODES:
            raise ValueError(f"SageModel.generate: decode={decode!r}, expected one of {DECODES}")
        self._special_ids()
        x = self.assemble(batch)
        gen = dict(max_new_tokens=max_new_tokens, stop_ids=self._tokenizer.stop_ids,
                   temperature=temperature, top_p=top_p, generator=generator,
                   pad_id=self._tokenizer.pad_id)
        if decode == "eager" or not use_cache:
            return self.llm.generate(inputs_embeds=x, attention_mask=batch["attention_mask"],
                                     use_cache=use_cache, **gen)
        need = (x.shape[0], x.shape[1] + max_new_tokens, x.dtype, x.device, decode == "graph")
        if self.static_decoder is None or not self.static_decoder.fits(*need):
            self.static_decoder = None  # free the old buffers (and graph) first
            self.static_decoder = StaticDecoder(self.llm, *need)
        return self.static_decoder.generate(inputs_embeds=x,
                                            attention_mask=batch["attention_mask"], **gen)

    # -------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None,
                        strict: bool = True) -> "SageModel":
        """SageModel from an InternVL2-layout directory (+ SAGE's `sage.*` keys if present).

        Config from config.json, vocab_size from the checkpoint's embedding table (InternVL2 adds
        tokens after Yi's 64000); built on meta, materialised on `device` (default CPU) in
        `dtype` (default: the checkpoint's), filled by sage.checkpoint.load_into. A plain
        InternVL2 directory (no sage_config) is the plain VLM: facts_mode "none", no fusion
        modules. With facts_mode "fe", fusion / head keys may be absent: they are initialised
        and listed in `model.load_report`. tokenizer.model must be there (FileNotFoundError
        naming the directory); the tokenizer is attached.
        Returned in eval().
        """
        path = Path(path)
        if not (path / "tokenizer.model").is_file():  # before minutes of loading weights
            raise FileNotFoundError(f"{path}: no tokenizer.model (a model directory needs its "
                                    "tokenizer beside the weights, as InternVL2 publishes it)")
        with torch.device("meta"):
            model = cls(cls.config_for(path, read_checkpoint_index(path)))
        model.load_report = load_into(model, path, model.key_map,
                                      dtype=dtype or checkpoint_dtype(path), strict=strict,
                                      new_ok=("fusion.", "fact_proj."), device=device)
        model.attach_tokenizer(path)
        return model.eval()

    @property
    def key_map(self) -> dict:
        """Published name -> ours for loading this model: without fusion modules (facts
        "hard" / "none") SAGE's tensors, if the checkpoint has any, are skipped."""
        return INTERNVL_KEY_MAP if self.fusion is not None else PLAIN_VLM_KEY_MAP

    @staticmethod
    def config_for(path: str | os.PathLike, ckpt: dict) -> SageConfig:
        """The config of checkpoint directory `path`: its config.json, with vocab_size from the
        embedding table in `ckpt` (read_checkpoint_index), which InternVL2 makes larger."""
        cfg = SageConfig.from_pretrained(path)
        check_config_metadata(cfg, path)  # the config recorded at export, where there is one
        emb = ckpt.get("language_model.model.embed_tokens.weight")
        if emb is not None and emb.shape[0] != cfg.llm.vocab_size:
            cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm,
                                                                   vocab_size=emb.shape[0]))
        return cfg

    def attach_tokenizer(self, path: str | os.PathLike) -> None:
        """Attach the tokenizer of directory `path` if it has a tokenizer.model."""
        if (Path(path) / "tokenizer.model").is_file():
            self.tokenizer = Tokenizer.from_pretrained(path)
