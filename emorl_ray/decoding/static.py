"""Decode steps of one fixed shape, which a GPU can replay as one captured graph.

With a DynamicCache every step grows each layer's keys and values by one position: new shapes and
new allocations every step, and on a GPU a step of a small model is mostly Python launching its
hundreds of kernels one by one (eager steps reached about 2.5 % of an H200's memory-bandwidth
bound, bench/ensemble_decode.py). Here the N = K * B rows' keys and values live in a
`StaticCache` of fixed length L (the prompt plus the new tokens, rounded up to `LENGTH_BUCKET`),
the attention mask covers all L positions from the first step (positions not yet written are
hidden by causality), and from one step to the next only the new token ids and their positions
change. Every step is then the same
computation on tensors at the same addresses, which `torch.compile(mode="reduce-overhead")`
captures once per (N, L) as a CUDA graph and replays. N is rounded up too (`padded_rows`): each
adapter block gets copies of its last row, whose outputs are dropped.

`model.decode_step` picks the step: "eager" (the dynamic cache; the CPU default), "static" (this
cache, run eagerly: the graph's computation without the graph) or "graph" (this cache, compiled).
The prompt pass itself is not captured (its shape changes with every batch); it is the engine's
`prefill`, copied into the static cache.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

from emorl_ray.decoding.prefill import Prefilled

LENGTH_BUCKET = 64  # L is rounded up to this, so that prompt lengths share their graphs
ROW_BUCKET = 8      # past 8 prompts, the rows of each adapter block are rounded up to a multiple of this
KEPT_CACHES = 4     # static caches (and so captured graphs' inputs) kept per model, least recently used dropped


def _decoder_forward(decoder, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
    """One step through the decoder stack (the LM head's input comes out; the engine applies the
    head to the combination of the K blocks)."""
    out = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    return out.last_hidden_state[:, -1]


_compiled_forward = None
RECOMPILE_LIMIT = 64


def compiled_forward():
    """One compiled step for every model (dynamo keys its graphs by the module and the shapes)."""
    global _compiled_forward
    if _compiled_forward is None:
        # One graph per (rows, cache length, adapter set): a search meets a few dozen. Past dynamo's
        # default of 8 it would fall back to eager steps with only a log line to say so.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        _compiled_forward = torch.compile(_decoder_forward, mode="reduce-overhead", dynamic=False)
    return _compiled_forward


def compile_counts(since: dict[str, int] | None = None) -> dict[str, int]:
    """Dynamo's and Inductor's running counts (minus the counts `since`, to see what a decode
    did): graphs compiled, graph breaks (each splits a step into pieces replayed separately, with
    Python in between) and compiled graphs not captured as CUDA graphs (on a GPU these replay
    kernel by kernel, and torch only logs why; on a CPU every compiled graph counts, there being
    none to capture)."""
    from torch._dynamo.utils import counters

    now = {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
           "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
    return {k: v - (since or {}).get(k, 0) for k, v in now.items()}


def uncaptured(counts: dict[str, int]) -> str | None:
    """What in `compile_counts` keeps a GPU's steps from replaying as whole CUDA graphs, if anything."""
    if not (counts["graph_breaks"] or counts["cudagraph_skips"]):
        return None
    return (f"{counts['graph_breaks']} graph breaks, {counts['cudagraph_skips']} compiled graphs not captured as "
            "CUDA graphs (torch's log says why)")


def decoder_of(model):
    """The transformer stack under the LM head, through a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def check_static(model) -> None:
    """What the static step needs from a decoder-only model: cache layers that keep the whole
    prefix (checked once per model, when its StaticDecoder is made)."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    layers = StaticCache(config=model.config, max_cache_len=LENGTH_BUCKET).layers
    if not layers or any(type(layer) is not StaticLayer for layer in layers):
        raise ValueError("model.decode_step 'static' and 'graph' need a model without sliding-window or "
                         "recurrent layers; use 'eager'")


def padded_rows(prompts: int) -> int:
    """The rows each adapter block runs in a fixed-shape step for `prompts` prompts: 1, 2, 4, 8, then
    the next multiple of ROW_BUCKET. Every new shape costs a compilation (about a minute on a CPU),
    and batches come in every size (the endpoint's requests, a split's last batch): rounded up, a
    few graphs serve them all. At these row counts a step's time goes mostly to reading the
    weights, which the extra rows do not add to (not yet measured on a GPU)."""
    return 1 << (prompts - 1).bit_length() if prompts <= 8 else -(-prompts // ROW_BUCKET) * ROW_BUCKET


def padding_index(blocks: int, prompts: int, device) -> torch.Tensor | None:
    """Which real row each padded row copies, block by block (adapter-major, as the engine lays
    the rows out): a block's own rows, then its last row again until `padded_rows`. None when no
    row is added. The copies repeat a real row's prompt pass, token and position, so they compute
    only what that row does, and their outputs are dropped."""
    padded = padded_rows(prompts)
    if padded == prompts:
        return None
    rows = torch.arange(blocks * prompts).view(blocks, prompts)
    return torch.cat([rows, rows[:, -1:].expand(blocks, padded - prompts)], 1).reshape(-1).to(device)


class StaticRun:
    """One decode's static cache, loaded with the prompt passes, and its constant attention mask.
    `index`: the padding rows (`padding_index`) the step adds to each block and drops again."""

    def __init__(self, forward, decoder, cache, mask: torch.Tensor, blocks: int, index: torch.Tensor | None):
        self.forward, self.decoder, self.cache, self.mask = forward, decoder, cache, mask
        self.blocks, self.index = blocks, index

    def step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The LM head's input (N, d) after feeding `ids` (N, 1) at positions `pos` (N, 1)."""
        if ids.device.type == "cuda":
            # A new replay: the previous step's output buffers may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        if self.index is None:
            return self.forward(self.decoder, ids, pos, self.mask, self.cache)
        h = self.forward(self.decoder, ids.index_select(0, self.index), pos.index_select(0, self.index), self.mask,
                         self.cache)
        prompts = ids.shape[0] // self.blocks
        return h.view(self.blocks, -1, h.shape[-1])[:, :prompts].reshape(-1, h.shape[-1])


class StaticDecoder:
    """A model's static caches, by (rows, length), kept across decodes: a captured graph reads its
    cache at fixed addresses, so a cache is reset and reused rather than made anew."""

    def __init__(self, model, compiled: bool):
        check_static(model)
        self.model, self.compiled = model, compiled
        self.caches: OrderedDict[tuple[int, int], object] = OrderedDict()

    def start(self, pre: Prefilled, attn: torch.Tensor, max_new_tokens: int, blocks: int) -> StaticRun:
        """`pre`: the N rows' prompt passes; `attn`: their (N, P) attention mask; `blocks`: the K
        adapter blocks the N rows form (no default: padded as one block, K blocks' rows would land
        in the wrong adapters' products)."""
        from transformers import StaticCache

        index = padding_index(blocks, attn.shape[0] // blocks, attn.device)
        if index is not None:
            pre, attn = pre.select(index), attn.index_select(0, index)
        rows, prompt_len = attn.shape
        length = -(-(prompt_len + max_new_tokens) // LENGTH_BUCKET) * LENGTH_BUCKET
        cache = self.caches.pop((rows, length), None)
        if cache is None:
            cache = StaticCache(config=self.model.config, max_cache_len=length)
            while len(self.caches) >= KEPT_CACHES:
                self.caches.popitem(last=False)
        else:
            cache.reset()
        self.caches[(rows, length)] = cache
        for i, (k, v) in enumerate(zip(pre.keys, pre.values)):
            cache.layers[i].update(k, v)  # positions 0..P-1; the step writes from P on
        mask = torch.ones(rows, length, dtype=attn.dtype, device=attn.device)
        mask[:, :prompt_len] = attn
        forward = compiled_forward() if self.compiled else _decoder_forward
        return StaticRun(forward, decoder_of(self.model), cache, mask, blocks, index)


_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def static_decoder(model, compiled: bool) -> StaticDecoder:
    """The model's static caches for compiled or eager steps, made on first use."""
    per_model = _decoders.setdefault(model, {})
    if compiled not in per_model:
        per_model[compiled] = StaticDecoder(model, compiled)
    return per_model[compiled]
