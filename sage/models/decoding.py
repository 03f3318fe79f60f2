"""Static-shape decoding (Eq. 10) for CUDA graphs: `Llama.generate`'s answers, one launch a token.

At batch 1 a decode step of a large LLM should cost one read of its weights. In eager mode a
step also pays every kernel launch from Python: for a 4-layer Yi-34B-width slice on an H200,
4.27 ms per token against a 1.29 ms bandwidth roofline, with the GPU busy only 1.73 ms of it
(docs/performance.md). A CUDA graph replays recorded kernels with one launch, but only when
every step runs the same kernels on the same addresses. `StaticDecoder` makes the step so:

  - the KV cache is allocated once for `max_len` positions (rounded up to `bucket`) and a step
    attends over all of it under a mask of the columns written so far
    (`sage.models.llama.static_decode_attention`);
  - the column to write and that mask live on the device and the step advances them itself
    (a row's RoPE position is its count of written columns), so nothing about a step is
    decided on the host;
  - the prompt (any length, left padded) is prefilled eagerly into the same buffers by
    `Llama.forward`, exactly as `Llama.generate` does.

`cuda_graph=True` (CUDA only) records the step once and replays it per token; `cuda_graph=False`
runs the identical step eagerly (the CPU tests, and the reference for the graph). Sampling
(`sample_next_token`) runs outside the graph. A decoder serves any batch of the same size whose
prompt + new tokens fit its buffers (`fits`), so an evaluation records once per batch size. The
graph holds the addresses of the weights it recorded: a model that is moved or re-materialised
needs a new decoder. Under tensor parallelism the step runs eagerly only (recording the ranks'
all-reduces is not tested).

    dec = StaticDecoder(llm, batch_size=1, max_len=1088, dtype=torch.bfloat16, device="cuda",
                        cuda_graph=True)
    new_ids = dec.generate(input_ids=prompt, max_new_tokens=64, stop_ids=(7,))  # (1, n_new)
"""

from __future__ import annotations

import torch

from sage.models.llama import Llama, rope_cos_sin, sample_next_token


class StaticDecoder:
    """Fixed buffers and a fixed decode step for one LLM, batch size and cache length."""

    def __init__(self, llm: Llama, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str, cuda_graph: bool = False, bucket: int = 256,
                 compile: bool = False):
        """max_len: prompt + new tokens the cache must hold (rounded up to a multiple of
        bucket, so nearby lengths share one decoder); compile: torch.compile the step first
        (kernel fusion; recorded in the graph after compiling)."""
        device = torch.device(device)
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"StaticDecoder: cuda_graph=True needs a CUDA device, got {device}")
        self.llm, self.batch_size, self.dtype, self.device = llm, batch_size, dtype, device
        self.max_len = -(-max_len // bucket) * bucket
        self.cache = llm.new_cache(batch_size, self.max_len, dtype=dtype, device=device)
        self.tok = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # fed token
        self.at = torch.zeros(1, dtype=torch.long, device=device)  # its cache column
        self.written = torch.zeros(batch_size, self.max_len, dtype=torch.bool, device=device)
        self.length = 0  # host copy of `at`: bounds checks without a device sync
        self._step = torch.compile(self._eager_step, dynamic=False) if compile else \
            self._eager_step
        self.graph, self._graph_logits = None, None
        if cuda_graph:
            self._record()

    def fits(self, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device,
             cuda_graph: bool) -> bool:
        """True when this decoder is the one to ask for such a batch: the same B, dtype,
        device and graph setting, and a cache long enough."""
        return (batch_size == self.batch_size and max_len <= self.max_len
                and dtype == self.dtype and torch.device(device) == self.device
                and cuda_graph == (self.graph is not None))

    # ------------------------------------------------------------------ the step

    def _eager_step(self) -> torch.Tensor:
        """Decode self.tok into cache column self.at, then advance it. Its position is the
        row's count of real tokens before it (cumsum(mask) - 1, as Llama.forward counts left
        padding). Static shapes and device-side state only.   -> logits (B, V)"""
        llm = self.llm
        x = llm.embed_tokens(self.tok)  # (B, 1, C)
        pos = self.written.sum(1, keepdim=True)  # (B, 1)
        cos, sin = rope_cos_sin(pos, llm.cfg.head_dim, llm.cfg.rope_theta, x.dtype)
        self.written.index_fill_(1, self.at, True)  # the new token sees itself
        mask = self.written[:, None, None, :]  # (B, 1, 1, S_max)
        for i, layer in enumerate(llm.layers):
            x = layer(x, cos, sin, mask, (self.cache.k[i], self.cache.v[i], self.at))  # (B,1,C)
        logits = llm.lm_head(llm.norm(x))[:, -1]  # (B, V)
        self.at.add_(1)
        return logits

    @torch.no_grad()
    def _record(self) -> None:
        """Warm up on a side stream (allocator, cuBLAS workspaces, compilation), record one
        step into a CUDA graph, then forget the warm-up's state."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._reset()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._graph_logits = self._step()  # recorded, not run: the state stays reset
        self._reset()

    def _reset(self) -> None:
        self.written.zero_()
        self.at.zero_()
        self.length = 0

    # ------------------------------------------------------------------ public

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Eager forward of a left-padded prompt (B, T) / (B, T, C) into the cache, as
        Llama.generate's first step.   -> logits of the next token (B, V)"""
        prompt = input_ids if input_ids is not None else inputs_embeds
        B, T = prompt.shape[:2]
        if B != self.batch_size or T > self.max_len:
            raise ValueError(f"StaticDecoder.prefill: prompt batch {B} x {T} tokens; this "
                             f"decoder holds {self.batch_size} x {self.max_len} positions")
        mask = (attention_mask.long() if attention_mask is not None
                else torch.ones(B, T, dtype=torch.long, device=prompt.device))  # (B, T)
        self.cache.length = 0
        logits = self.llm(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask,
                          cache=self.cache, logits_to_keep=1)[:, -1]  # (B, V)
        self.written.zero_()
        self.written[:, :T] = mask.bool()
        self.at.fill_(T)
        self.length = T
        return logits

    @torch.no_grad()
    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,) -> logits of the next (B, V). With a graph the result
        is its output buffer, overwritten by the next step: read it before."""
        if self.length >= self.max_len:
            raise ValueError(f"StaticDecoder.step: the cache's {self.max_len} positions are full")
        self.tok.copy_(tok[:, None])
        self.length += 1
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self._graph_logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None,
                 inputs_embeds: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, max_new_tokens: int = 64,
                 stop_ids: tuple[int, ...] = (), temperature: float = 0.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, pad_id: int = 0,
                 check_every: int = 8) -> torch.Tensor:
        """Llama.generate's contract and results (stop tokens kept, pad_id after them, an early
        end once every row has stopped) with the static step. Whether all rows have stopped
        is read back every check_every tokens (a read is a host sync that would otherwise
        stall the next launch); tokens past the first all-stopped step are dropped, so the
        output equals Llama.generate's.   -> new tokens (B, n_new)"""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("StaticDecoder.generate: pass exactly one of input_ids and "
                             "inputs_embeds")
        T = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if T + max_new_tokens - 1 > self.max_len:
            raise ValueError(f"StaticDecoder.generate: {T} prompt + {max_new_tokens} new tokens "
                             f"do not fit {self.max_len} positions")
        logits = self.prefill(input_ids, inputs_embeds, attention_mask)
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=logits.device)
        done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        out, all_done = [], []
        for t in range(max_new_tokens):
            tok = sample_next_token(logits, temperature, top_p, generator)  # (B,)
            tok = tok.masked_fill(done, pad_id)
            out.append(tok)
            done = done | torch.isin(tok, stop)
            all_done.append(done.all())
            if t + 1 == max_new_tokens or ((t + 1) % check_every == 0 and bool(all_done[-1])):
                break
            logits = self.step(tok)
        if not out:
            return torch.empty(done.shape[0], 0, dtype=torch.long, device=done.device)
        finished = torch.stack(all_done)  # (n,) one read for the trim
        n_new = int(finished.int().argmax()) + 1 if bool(finished.any()) else len(out)
        return torch.stack(out[:n_new], dim=1)  # (B, n_new)
