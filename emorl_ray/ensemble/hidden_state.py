"""Ensemble decoding from one base model and K LoRA adapters (spec §5, §6).

Hidden-state aggregation is EMORL's method; logit and parameter aggregation are the comparisons,
selected by `aggregation` so that search and evaluation treat all three alike:
- "hidden_state": h = sum_i w_i h_i with w normalised to sum 1, then the shared LM head (below);
- "logit": every adapter's next-token distribution on the SAME shared prefix, mixed as
  p = sum_i (w_i / sum w) p_i (a proper ensemble; the authors mixed independently sampled paths);
- "parameter": one merged adapter with delta W = sum_i w_i B_i A_i exactly (peft's "cat"
  combination, not averaged A and B factors), then plain decoding. Unlike the other two, it is
  not invariant to scaling w, so its weights are used as given.

One weight convention: hidden-state and logit aggregation decode with w / sum(w). The logits are
linear in h, so unnormalised weights would scale them: w = (1, 1, 1) would sample at an effective
temperature of 1/3 (greedy decoding is unaffected). `weights_used` says what was applied.

At every decoding step all adapters run on the same prefix in ONE batched forward: the batch is
repeated once per adapter (adapter-major blocks) and every LoRA layer applies all K adapters to
their blocks in one batched product (`_StackedLoRA`; peft's mixed-adapter batches otherwise).
Each adapter's last hidden state (the LM-head input: after the final norm, and after T5's
d_model^-0.5 rescale where HF applies it) is combined, h = sum_i w_i h_i, and the shared LM head
picks the next token, which is fed to every row. KV cache per row, encoder run once (seq2seq),
a per-sequence finished mask (nothing after EOS leaks), stop when every sequence has finished.
"""

from __future__ import annotations

import contextlib
import math
from typing import Mapping, Sequence

import torch

from emorl_ray import storage
from emorl_ray.decoding.sampling import choose_token, device_generator
from emorl_ray.models import Policy

BASE = "__base__"  # peft's name for "no adapter" in mixed-adapter batches
MERGED = "__merged__"
AGGREGATIONS = ("hidden_state", "logit", "parameter")


class WeightError(ValueError):
    pass


class _LMHeadInput:
    """Captures the LM head's input. With `skip_head` (the fast path) it hands the head an empty
    slice, so the K*B rows' full vocabulary projections (wasted work: only the combined state is
    projected) are never computed."""

    def __init__(self, model, skip_head: bool = True):
        self.head = model.get_output_embeddings()
        self.skip_head = skip_head
        self.value = None

    def _hook(self, module, args):
        self.value = args[0]
        return (args[0][..., :0, :],) if self.skip_head else None

    def __enter__(self):
        self._handle = self.head.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


_SKINNY_ROWS = 48  # up to this many rows, _linear multiplies W @ x^T on a CPU


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T (+ b) for 2-D x. A decode step multiplies a handful of rows (K*B) by every weight
    matrix; on a CPU, MKL streams the weight 2-4x faster for 2-6 rows when the product is written
    W @ x^T (the weight as the left operand), and is still ahead up to about 48 rows, while
    prefill-sized inputs are faster as F.linear (bench/skinny_matmul.py, on SmolLM2's shapes).
    GPUs keep F.linear: nothing was measured there."""
    if x.device.type != "cpu" or x.shape[0] > _SKINNY_ROWS:
        return torch.nn.functional.linear(x, weight, bias)
    y = torch.mm(weight, x.t()).t().contiguous()
    return y if bias is None else y.add_(bias)


class _StackedLoRA:
    """All K adapters in one batched LoRA product per layer, for adapter-major row blocks.

    peft's mixed-adapter batches (`adapter_names=`) gather and scatter every adapter's rows in
    every LoRA layer at every step, in Python; with K contiguous row blocks the whole LoRA term is
    two batched matmuls: delta = bmm(bmm(x_k, A_k^T), (s_k B_k)^T). Inside this context each LoRA
    layer's forward is replaced by base product + stacked term (peft's own forward, which is left
    untouched outside, would add its single active adapter to every row). Adapters of different
    rank are zero-padded to the largest rank.
    """

    def __init__(self, model, names: list[str]):
        self.model, self.names = model, names
        # The adapters' weights never change after loading: the ensemble keeps one per adapter set.
        self.stacks = [(m, *self._stacks(m)) for m in model.modules()
                       if hasattr(m, "lora_A") and hasattr(m, "base_layer")
                       and isinstance(m.base_layer, torch.nn.Linear) and any(n in m.lora_A for n in names)]

    @staticmethod
    def supported(model, names: list[str]) -> bool:
        for m in model.modules():
            if hasattr(m, "lora_A") and hasattr(m, "base_layer"):
                if not isinstance(m.base_layer, torch.nn.Linear) or any(n in m.lora_variant for n in names):
                    return False
                if getattr(m, "merged_adapters", None):  # a merged adapter lives inside the base weight
                    return False
            if hasattr(m, "lora_embedding_A") and any(n in m.lora_embedding_A for n in names):
                return False
        return True

    def _stacks(self, m):
        base = m.base_layer.weight
        r = max(m.lora_A[n].weight.shape[0] for n in self.names if n in m.lora_A)
        A = base.new_zeros(len(self.names), base.shape[1], r)
        B = base.new_zeros(len(self.names), r, base.shape[0])
        for k, n in enumerate(self.names):
            if n in m.lora_A:
                a, b = m.lora_A[n].weight, m.lora_B[n].weight
                A[k, :, :a.shape[0]] = a.t()
                B[k, :b.shape[1], :] = (b * m.scaling[n]).t()
        return A, B

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        # LoRA layers this context does not replace (other adapters' only) must add nothing.
        self._stack.enter_context(self.model.disable_adapter())
        K = len(self.names)
        for m, A, B in self.stacks:
            base = m.base_layer
            # Subclasses of Linear (quantized layers) compute their own product.
            product = base if type(base) is not torch.nn.Linear else (
                lambda rows, base=base: _linear(rows, base.weight, base.bias))

            def forward(x, *args, product=product, A=A, B=B, **kwargs):
                rows = x.reshape(-1, x.shape[-1])
                y = product(rows)
                xa = torch.bmm(rows.view(K, -1, rows.shape[-1]).to(A.dtype), A)
                y.view(K, -1, y.shape[-1]).baddbmm_(xa.to(y.dtype), B.to(y.dtype))
                return y.view(*x.shape[:-1], -1)

            m.forward = forward  # an instance attribute shadows the class's forward until removed
            self._stack.callback(delattr, m, "forward")
        return self

    def __exit__(self, *exc):
        self._stack.close()


def check_weights(weights: Mapping[str, float] | Sequence[float], names: list[str]) -> list[float]:
    """Weights by adapter name (or in adapter order) -> a list; WeightError says what is wrong."""
    if isinstance(weights, Mapping):
        unknown = set(weights) - set(names)
        if unknown:
            raise WeightError(f"weights name unknown adapters {sorted(unknown)}; adapters are {names}")
        missing = set(names) - set(weights)
        if missing:
            raise WeightError(f"weights are missing for adapters {sorted(missing)}")
        w = [weights[n] for n in names]
    else:
        w = list(weights)
        if len(w) != len(names):
            raise WeightError(f"got {len(w)} weights for {len(names)} adapters {names}")
    try:
        w = [float(x) for x in w]
    except (TypeError, ValueError):
        raise WeightError(f"weights must be numbers, got {w!r}") from None
    if not all(math.isfinite(x) for x in w):
        raise WeightError(f"weights must be finite, got {w}")
    if any(x < 0 for x in w):
        raise WeightError(f"weights must be >= 0, got {w}")
    if sum(w) == 0:
        raise WeightError("weights are all zero: the combined hidden state would be 0 and every "
                          "token the same; give at least one adapter a positive weight")
    return w


def weights_used(w: Sequence[float], names: list[str], aggregation: str) -> dict[str, float]:
    if aggregation == "parameter":
        return dict(zip(names, (float(x) for x in w)))
    total = float(sum(w))
    return {n: float(x) / total for n, x in zip(names, w)}


class AdapterEnsemble:
    def __init__(self, policy: Policy, adapters: Mapping[str, str]):
        from peft import PeftModel

        if not adapters:
            raise ValueError("the ensemble needs at least one adapter directory")
        for name, path in adapters.items():
            if not storage.is_file(storage.join(path, "adapter_config.json")):
                raise ValueError(f"adapter {name!r}: {path} holds no adapter_config.json; give a directory "
                                 "written by PeftModel.save_pretrained (a run's training/<run>/adapter)")
        # A run on object storage: this node reads a local copy (fetched once, cached by content).
        adapters = {name: storage.local_dir(path) for name, path in adapters.items()}
        self.names = list(adapters)
        model = PeftModel.from_pretrained(policy.model, adapters[self.names[0]], adapter_name=self.names[0])
        for name in self.names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
        self.model = model.eval()
        self.policy = policy
        self._routings: dict[tuple[str, ...], _StackedLoRA | str] = {}

    def check_weights(self, weights: Mapping[str, float] | Sequence[float]) -> list[float]:
        return check_weights(weights, self.names)

    def weights_used(self, weights: Mapping[str, float] | Sequence[float],
                     aggregation: str = "hidden_state") -> dict[str, float]:
        """The weights a decode applies: w / sum(w), except for parameter aggregation, whose
        merged delta W = sum_i w_i B_i A_i depends on the scale of w."""
        return weights_used(self.check_weights(weights), self.names, aggregation)

    def _routing(self, names: list[str]):
        """How K adapters share one batched forward: stacked LoRA products, or peft's mixed-adapter
        batches for what the stack does not cover (LoRA variants, embedding adapters). Kept per set
        of adapters, except the merged one, which is rebuilt with new weights on every call."""
        routing = self._routings.get(tuple(names))
        if routing is None:
            routing = _StackedLoRA(self.model, names) if _StackedLoRA.supported(self.model, names) else "mixed"
            if MERGED not in names:
                self._routings[tuple(names)] = routing
        return routing

    @torch.no_grad()
    def generate(self, prompts: list[str], weights, max_new_tokens: int, batch_size: int = 16,
                 greedy: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, aggregation: str = "hidden_state", details: bool = False) -> list:
        """`weights`: one vector (by adapter name, or in adapter order) for every prompt, a list of
        one vector per prompt (rows with different weights decode in the same batched forward), or
        None for the base model (all adapters off), through the same loop. `details`: per prompt
        {"text", "tokens" (generated, EOS included), "finished" (EOS reached)} instead of the text."""
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if weights is None:
            return self._generate(prompts, [BASE], None, max_new_tokens, batch_size, greedy, temperature,
                                  top_k, top_p, seed, False, details)
        rows = self.row_weights(weights, len(prompts))
        if aggregation == "parameter":
            # One merged adapter per distinct weight vector: delta W depends on all of w, per row.
            texts: list = [None] * len(prompts)
            groups: dict[tuple, list[int]] = {}
            for i, w in enumerate(rows):
                groups.setdefault(tuple(w), []).append(i)
            for w, idx in groups.items():
                active = [(n, x) for n, x in zip(self.names, w) if x > 0]
                self.model.add_weighted_adapter([n for n, _ in active], [x for _, x in active], MERGED,
                                                combination_type="cat")
                try:
                    out = self._generate([prompts[i] for i in idx], [MERGED], None, max_new_tokens, batch_size,
                                         greedy, temperature, top_k, top_p, seed, False, details)
                finally:
                    self.model.delete_adapter(MERGED)
                for i, t in zip(idx, out):
                    texts[i] = t
            return texts
        # An adapter with weight 0 in every row adds exactly nothing (to h or p): skip it.
        keep = [k for k, _ in enumerate(self.names) if any(w[k] > 0 for w in rows)]
        w = torch.tensor([[r[k] for k in keep] for r in rows], dtype=torch.float32)
        w = w / w.sum(1, keepdim=True)  # the weight convention (module docstring)
        return self._generate(prompts, [self.names[k] for k in keep], w, max_new_tokens, batch_size, greedy,
                              temperature, top_k, top_p, seed, aggregation == "logit", details)

    def row_weights(self, weights, n: int) -> list[list[float]]:
        """One checked weight vector per prompt, from one vector or a list of n of them."""
        per_row = (isinstance(weights, (list, tuple)) and len(weights) > 0
                   and isinstance(weights[0], (Mapping, list, tuple)))
        if not per_row:
            return [self.check_weights(weights)] * n
        if len(weights) != n:
            raise WeightError(f"got {len(weights)} weight vectors for {n} prompts; give one per prompt")
        return [self.check_weights(w) for w in weights]

    def _generate(self, prompts, names, w, max_new_tokens, batch_size, greedy, temperature, top_k, top_p, seed,
                  mix_logits, details=False) -> list:
        """`w`: (len(prompts), len(names)) normalised weights, or None for one adapter (base or merged)."""
        gen = device_generator(seed, self.policy.device)
        routing = "base" if names == [BASE] else self._routing(names)
        texts = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            wi = torch.ones(len(chunk), 1) if w is None else w[i:i + batch_size]
            ids = self._generate_ids(chunk, names, wi, max_new_tokens, greedy, temperature, top_k, top_p, gen,
                                     routing, mix_logits)
            if not details:
                texts.extend(self.policy.decode(ids))
                continue
            eos = ids == self.policy.eos_token_id
            ended = eos.any(1)
            counts = torch.where(ended, eos.int().argmax(1) + 1, torch.full_like(ended, ids.shape[1], dtype=torch.long))
            texts.extend({"text": t, "tokens": int(c), "finished": bool(e)}
                         for t, c, e in zip(self.policy.decode(ids), counts.tolist(), ended.tolist()))
        return texts

    def _generate_ids(self, prompts, names, w_rows, max_new_tokens, greedy, temperature, top_k, top_p, gen, routing,
                      mix_logits=False):
        policy, model = self.policy, self.model
        K, B = len(names), len(prompts)
        dev = policy.device
        w = w_rows.t().to(dev).reshape(K, B, 1)  # adapter-major, like the repeated batch
        enc = policy.encode(prompts)
        attn = enc["attention_mask"].repeat(K, 1)
        head = model.get_output_embeddings()
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        tokens = []
        kw = {}
        if routing == "base":
            routing = model.disable_adapter()
        elif routing == "mixed":
            routing, kw = contextlib.nullcontext(), {"adapter_names": [n for n in names for _ in range(B)]}
        with _LMHeadInput(model) as cap, routing:
            if policy.is_seq2seq:
                start = torch.full((K * B, 1), model.config.decoder_start_token_id, device=dev)
                out = model(input_ids=enc["input_ids"].repeat(K, 1), attention_mask=attn,
                            decoder_input_ids=start, use_cache=True, **kw)
                encoder_outputs = (out.encoder_last_hidden_state,)
            else:
                pos = (attn.cumsum(1) - 1).clamp(min=0)
                out = model(input_ids=enc["input_ids"].repeat(K, 1), attention_mask=attn, position_ids=pos,
                            use_cache=True, logits_to_keep=1, **kw)
            for _ in range(max_new_tokens):
                rows_h = cap.value[:, -1]
                # _linear, not head(): the capture hook sits on head's forward.
                if mix_logits:   # p = sum_i w_i p_i on the shared prefix, as log-probs for choose_token
                    logp = _linear(rows_h, head.weight, head.bias).float()
                    logp = (logp / temperature).log_softmax(-1).view(K, B, -1)
                    logits = torch.logsumexp(logp + w.log().to(logp.dtype), dim=0)
                    step_temperature = 1.0
                else:            # h = sum_i w_i h_i, one projection
                    h = (w * rows_h.view(K, B, -1).to(w.dtype)).sum(0)
                    logits = _linear(h.to(head.weight.dtype), head.weight, head.bias).float()
                    step_temperature = temperature
                nxt = choose_token(logits, greedy, step_temperature, top_k, top_p, gen).to(dev)
                nxt = nxt.masked_fill(finished, policy.pad_token_id)
                tokens.append(nxt)
                finished |= nxt == policy.eos_token_id
                if finished.all():
                    break
                step = nxt.repeat(K).unsqueeze(1)
                if policy.is_seq2seq:
                    out = model(encoder_outputs=encoder_outputs, attention_mask=attn, decoder_input_ids=step,
                                past_key_values=out.past_key_values, use_cache=True, **kw)
                else:
                    attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
                    pos = pos[:, -1:] + 1
                    out = model(input_ids=step, attention_mask=attn, position_ids=pos,
                                past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1, **kw)
        return torch.stack(tokens, 1)
