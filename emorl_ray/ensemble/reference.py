"""A deliberately plain hidden-state ensemble, shaped like the authors' loop (docs/method.md §3):
K full model copies (each adapter merged into its own copy of the base), no KV cache, the whole
prompt + prefix re-run through every model at every step, and, as there, the LM head applied to
every position (each model's own forward, then the combined states) though only the last is used.

It is the correctness oracle for `AdapterEnsemble` (same tokens, see tests) and the speed
baseline of `bench/ensemble_decode.py`. Unlike the authors' loop it pads after EOS, so that the
two can be compared token for token; it is never used for real work.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch

from emorl_ray import storage
from emorl_ray.decoding.engine import LMHeadInput
from emorl_ray.decoding.prefill import positions
from emorl_ray.models import Policy


class ReferenceEnsemble:
    def __init__(self, policy: Policy, adapters: Mapping[str, str]):
        from peft import PeftModel

        self.policy = policy
        self.names = list(adapters)
        self.models = [PeftModel.from_pretrained(copy.deepcopy(policy.model), storage.local_dir(adapters[n]))
                       .merge_and_unload().eval()
                       for n in self.names]

    @torch.no_grad()
    def generate(self, prompts: list[str], weights: Mapping[str, float], max_new_tokens: int) -> list[str]:
        p = self.policy
        enc = p.encode(prompts)
        B, dev = len(prompts), enc["input_ids"].device
        out = torch.empty(B, 0, dtype=torch.long, device=dev)
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        for _ in range(max_new_tokens):
            h = 0
            for name, model in zip(self.names, self.models):
                with LMHeadInput(model, skip_head=False) as cap:
                    if p.is_seq2seq:
                        start = torch.full((B, 1), model.config.decoder_start_token_id, device=dev)
                        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                              decoder_input_ids=torch.cat([start, out], 1))
                    else:
                        ids = torch.cat([enc["input_ids"], out], 1)
                        attn = torch.cat([enc["attention_mask"], torch.ones_like(out)], 1)
                        model(input_ids=ids, attention_mask=attn, position_ids=positions(attn))
                h = h + weights[name] * cap.value
            head = self.models[0].get_output_embeddings()
            nxt = torch.nn.functional.linear(h, head.weight, head.bias)[:, -1].argmax(-1)
            nxt = nxt.masked_fill(finished, p.pad_token_id)
            out = torch.cat([out, nxt[:, None]], 1)
            finished |= nxt == p.eos_token_id
            if finished.all():
                break
        return p.decode(out)
