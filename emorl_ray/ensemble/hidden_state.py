"""Hidden-state aggregation, EMORL's stage 2 (spec §5), from one base model and K LoRA adapters.

At every decoding step all adapters run on the same prefix in ONE batched forward: the batch is
repeated once per adapter and peft's `adapter_names` routes each row through its own adapter.
Each adapter's last hidden state (the LM-head input: after the final norm, and after T5's
d_model^-0.5 rescale where HF applies it) is combined, h = sum_i w_i h_i, and the shared LM head
picks the next token, which is fed to every row. KV cache per row, encoder run once (seq2seq),
a per-sequence finished mask (nothing after EOS leaks), stop when every sequence has finished.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from emorl_ray.models import Policy

BASE = "__base__"  # peft's name for "no adapter" in mixed-adapter batches


class WeightError(ValueError):
    pass


class _LMHeadInput:
    """Captures the LM head's input and hands the head an empty slice, so the K*B rows' full
    vocabulary projections (wasted work: only the combined state is projected) are never computed."""

    def __init__(self, model):
        self.head = model.get_output_embeddings()
        self.value = None

    def _hook(self, module, args):
        self.value = args[0]
        return (args[0][..., :0, :],)

    def __enter__(self):
        self._handle = self.head.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def choose_token(logits: torch.Tensor, greedy: bool, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    if greedy:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class AdapterEnsemble:
    def __init__(self, policy: Policy, adapters: Mapping[str, str]):
        from peft import PeftModel

        if not adapters:
            raise ValueError("the ensemble needs at least one adapter directory")
        self.names = list(adapters)
        model = PeftModel.from_pretrained(policy.model, adapters[self.names[0]], adapter_name=self.names[0])
        for name in self.names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
        self.model = model.eval()
        self.policy = policy

    def check_weights(self, weights: Mapping[str, float] | Sequence[float]) -> list[float]:
        if isinstance(weights, Mapping):
            unknown = set(weights) - set(self.names)
            if unknown:
                raise WeightError(f"weights name unknown adapters {sorted(unknown)}; adapters are {self.names}")
            missing = set(self.names) - set(weights)
            if missing:
                raise WeightError(f"weights are missing for adapters {sorted(missing)}")
            w = [weights[n] for n in self.names]
        else:
            w = list(weights)
            if len(w) != len(self.names):
                raise WeightError(f"got {len(w)} weights for {len(self.names)} adapters {self.names}")
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

    @torch.no_grad()
    def generate(self, prompts: list[str], weights: Mapping[str, float] | Sequence[float] | None,
                 max_new_tokens: int, batch_size: int = 16, greedy: bool = True, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> list[str]:
        """`weights=None` generates with the base model (all adapters off), through the same loop."""
        if weights is None:
            active = [(BASE, 1.0)]
        else:
            # An adapter with weight 0 adds exactly nothing to h: skip its rows.
            active = [(n, w) for n, w in zip(self.names, self.check_weights(weights)) if w > 0]
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        texts = []
        for i in range(0, len(prompts), batch_size):
            ids = self._generate_ids(prompts[i:i + batch_size], active, max_new_tokens, greedy,
                                     temperature, top_k, top_p, gen)
            texts.extend(self.policy.decode(ids))
        return texts

    def _generate_ids(self, prompts, active, max_new_tokens, greedy, temperature, top_k, top_p, gen):
        policy, model = self.policy, self.model
        K, B = len(active), len(prompts)
        dev = policy.device
        rows = [name for name, _ in active for _ in range(B)]
        w = torch.tensor([wi for _, wi in active], device=dev).view(K, 1, 1)
        enc = policy.encode(prompts)
        attn = enc["attention_mask"].repeat(K, 1)
        head = model.get_output_embeddings()
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        tokens = []
        with _LMHeadInput(model) as cap:
            if policy.is_seq2seq:
                start = torch.full((K * B, 1), model.config.decoder_start_token_id, device=dev)
                out = model(input_ids=enc["input_ids"].repeat(K, 1), attention_mask=attn,
                            decoder_input_ids=start, adapter_names=rows, use_cache=True)
                encoder_outputs = (out.encoder_last_hidden_state,)
            else:
                pos = (attn.cumsum(1) - 1).clamp(min=0)
                out = model(input_ids=enc["input_ids"].repeat(K, 1), attention_mask=attn, position_ids=pos,
                            adapter_names=rows, use_cache=True, logits_to_keep=1)
            for _ in range(max_new_tokens):
                h = (w * cap.value[:, -1].view(K, B, -1).to(w.dtype)).sum(0)   # h = sum_i w_i h_i
                # F.linear, not head(): the capture hook sits on head's forward.
                logits = torch.nn.functional.linear(h.to(head.weight.dtype), head.weight, head.bias).float()
                nxt = choose_token(logits, greedy, temperature, top_k, top_p, gen).to(dev)
                nxt = nxt.masked_fill(finished, policy.pad_token_id)
                tokens.append(nxt)
                finished |= nxt == policy.eos_token_id
                if finished.all():
                    break
                step = nxt.repeat(K).unsqueeze(1)
                if policy.is_seq2seq:
                    out = model(encoder_outputs=encoder_outputs, attention_mask=attn, decoder_input_ids=step,
                                past_key_values=out.past_key_values, adapter_names=rows, use_cache=True)
                else:
                    attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
                    pos = pos[:, -1:] + 1
                    out = model(input_ids=step, attention_mask=attn, position_ids=pos,
                                past_key_values=out.past_key_values, adapter_names=rows, use_cache=True,
                                logits_to_keep=1)
        return torch.stack(tokens, 1)
