"""The decode loop every generator in the package runs: the k-SCST rollouts and validation, the
search trials, the evaluation and the HTTP endpoint (docs/method.md §3).

One prefill, then one token per step from a KV cache, for N = K * B rows: B prompts, each
repeated once per adapter in adapter-major blocks (K = 1 for a single policy). How the K blocks
run their adapters in the same forward is the caller's business (a context it enters around
`decode`: stacked LoRA products, peft's mixed batches, the adapter switched off, or simply the
model as it is). What the engine does with the blocks at every step:

- "hidden_state" (EMORL): the last hidden states, the LM head's input, are combined,
  h = sum_i w_i h_i, and projected once by the shared LM head;
- "logit": each block's next-token distribution is mixed, p = sum_i w_i p_i, on the shared prefix.

Then one token per prompt, greedy or drawn from `warp_logits` (temperature, top-k, top-p), is fed
to every block. A finished mask pads after EOS; the loop stops when every prompt has finished.
Weights are per prompt, (B, K), already normalised by the caller (`ensemble.weights`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from emorl_ray.decoding.prefill import Prefilled, positions
from emorl_ray.decoding.sampling import choose_token, device_generator, token_logprobs_under
from emorl_ray.decoding.static import static_decoder

_SKINNY_ROWS = 48  # up to this many rows, `linear` multiplies W @ x^T on a CPU
# Steps by which the stop check may trail the decode, per device type (see StopCheck).
STOP_CHECK_LAG = {"cuda": 1}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T (+ b) for 2-D x. A decode step multiplies a handful of rows by every weight matrix;
    on a CPU, MKL streams the weight 2-4x faster for 2-6 rows when the product is written W @ x^T
    (the weight as the left operand), and is still ahead up to about 48 rows, while prefill-sized
    inputs are faster as F.linear (bench/skinny_matmul.py, on SmolLM2's shapes). GPUs keep
    F.linear: nothing was measured there."""
    if x.device.type != "cpu" or x.shape[0] > _SKINNY_ROWS:
        return torch.nn.functional.linear(x, weight, bias)
    y = torch.mm(weight, x.t()).t().contiguous()
    return y if bias is None else y.add_(bias)


class LMHeadInput:
    """Captures the LM head's input: the last hidden state after the final norm (and after T5's
    d_model^-0.5 rescale, where Hugging Face applies it). With `skip_head` it hands the head an
    empty slice, so the N rows' full-vocabulary projections, of which only the combination is
    used, are never computed."""

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


@dataclass
class Sampling:
    """How a token is chosen: None in place of this means greedy."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None  # on the model's device; None = torch's global RNG


@dataclass
class Decoded:
    ids: torch.Tensor                     # (B, T) generated ids, pad after the first EOS
    mask: torch.Tensor                    # (B, T) 1 up to and including the first EOS
    ended: torch.Tensor                   # (B,) whether EOS was reached
    logprobs: torch.Tensor | None = None  # (B, T) log-prob of each token under what it was drawn from


class StopCheck:
    """Whether every prompt has finished, asked once a step. Reading a device's flag on the host
    waits for the device to finish the step; the host would then launch the next step (its eager
    kernels and the graph replay) onto an idle device, and every step would pay the host's time on
    top of the device's. With `lag` 1 the flag is copied to the host without waiting and read one
    step later, while the device already runs the next step: the decode then computes at most one
    step past the end of the longest row, whose tokens (all padding) the caller drops. On a CPU
    nothing runs ahead of the host, and the flag is read at once (lag 0)."""

    def __init__(self, device: torch.device):
        self.lag = STOP_CHECK_LAG.get(device.type, 0)
        self.pending: tuple[torch.Tensor, object] | None = None

    def all_finished(self, finished: torch.Tensor) -> bool:
        """Whether every row had finished `self.lag` steps ago (this step's flag is kept for later)."""
        flag = finished.all()
        if self.lag == 0:
            return bool(flag)
        if flag.device.type == "cuda":
            ready = torch.cuda.Event()
            flag = flag.to("cpu", non_blocking=True)  # into pinned memory, done when `ready` is
            ready.record()
        else:
            ready = None
        before, self.pending = self.pending, (flag, ready)
        if before is None:
            return False
        if before[1] is not None:
            before[1].synchronize()  # the step before this one: this step stays queued on the device
        return bool(before[0])


def response_mask(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for every token up to and including the first EOS, 0 after it."""
    is_eos = (ids == eos_id).long()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0
    return (~after_eos).long()


def _next_logits(rows_h: torch.Tensor, w: torch.Tensor, head, aggregation: str,
                 temperature: float) -> tuple[torch.Tensor, float]:
    """The combined next-token logits of B prompts from their K blocks' hidden states (K*B, d),
    and the temperature still to apply to them."""
    K, B = w.shape[0], w.shape[1]
    if aggregation == "logit":  # p = sum_i w_i p_i, as log-probs: already at `temperature`
        logp = linear(rows_h, head.weight, head.bias).float()
        logp = (logp / temperature).log_softmax(-1).view(K, B, -1)
        return torch.logsumexp(logp + w.log().to(logp.dtype), dim=0), 1.0
    h = (w * rows_h.view(K, B, -1).to(w.dtype)).sum(0)  # h = sum_i w_i h_i, one projection
    return linear(h.to(head.weight.dtype), head.weight, head.bias).float(), temperature


@torch.no_grad()
def prefill(model, enc: dict, forward_kwargs: dict | None = None) -> Prefilled:
    """One block's pass over the encoded prompts (in the adapter routing the caller set)."""
    attn = enc["attention_mask"]
    with LMHeadInput(model) as cap:
        out = model(input_ids=enc["input_ids"], attention_mask=attn, position_ids=positions(attn), use_cache=True,
                    logits_to_keep=1, **(forward_kwargs or {}))
    layers = out.past_key_values.layers
    # clone: the slice would keep the whole prompt's hidden states alive
    return Prefilled([layer.keys for layer in layers], [layer.values for layer in layers], cap.value[:, -1].clone())


@torch.no_grad()
def decode(policy, model, prompts: list[str], max_new_tokens: int, *, sampling: Sampling | None = None,
           weights: torch.Tensor | None = None, aggregation: str = "hidden_state", forward_kwargs: dict | None = None,
           return_logprobs: bool = False, enc: dict | None = None, prefilled: Prefilled | None = None) -> Decoded:
    """Generate for `prompts` with `model` (in the mode and adapter routing the caller set).
    `weights`: (B, K) per-prompt weights of the K adapter blocks (None: one block, weight 1).
    `enc`: the prompts already encoded by `policy.encode`, where the caller has them.
    `prefilled`: the K blocks' pass over exactly these encoded prompts, where the caller kept it
    (decoder-only models); the decode then starts at the first new token."""
    B = len(prompts)
    dev = policy.device
    w = torch.ones(B, 1) if weights is None else weights
    K = w.shape[1]
    w = w.t().to(dev).reshape(K, B, 1)  # adapter-major, like the repeated batch
    temperature = sampling.temperature if sampling is not None else 1.0
    kw = forward_kwargs or {}
    enc = enc if enc is not None else policy.encode(prompts)
    attn = enc["attention_mask"].repeat(K, 1)
    head = model.get_output_embeddings()
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    stop = StopCheck(dev)
    tokens, logprobs = [], []
    static = None  # a fixed-shape step (decoding.static), where the policy asks for one
    if not policy.is_seq2seq and getattr(policy, "decode_step", "eager") != "eager":
        if kw:  # peft's mixed batches are set up by PeftModel.forward, which the static step bypasses
            raise ValueError("model.decode_step 'static' and 'graph' need LoRA adapters on Linear layers (the "
                             "stacked product); these adapters need peft's mixed batches: use 'eager'")
        if prefilled is None:
            prefilled = prefill(model, {"input_ids": enc["input_ids"].repeat(K, 1), "attention_mask": attn})
        static = static_decoder(model, compiled=policy.decode_step == "graph").start(prefilled, attn, max_new_tokens,
                                                                                     blocks=K)
    with LMHeadInput(model) as cap:
        if policy.is_seq2seq:
            start = torch.full((K * B, 1), model.config.decoder_start_token_id, device=dev)
            out = model(input_ids=enc["input_ids"].repeat(K, 1), attention_mask=attn, decoder_input_ids=start,
                        use_cache=True, **kw)
            encoder_outputs = (out.encoder_last_hidden_state,)
            past, h = out.past_key_values, cap.value[:, -1]
        else:
            pos = positions(attn)
            if prefilled is None:
                out = model(input_ids=enc["input_ids"].repeat(K, 1), attention_mask=attn, position_ids=pos,
                            use_cache=True, logits_to_keep=1, **kw)
                past, h = out.past_key_values, cap.value[:, -1]
            else:
                if prefilled.last_hidden.shape[0] != K * B or prefilled.keys[0].shape[-2] != attn.shape[1]:
                    raise ValueError("the prefilled blocks do not match the prompts being decoded")
                past = None if static is not None else prefilled.cache(model.config)
                h = prefilled.last_hidden
        for t in range(max_new_tokens):
            # `linear`, not head(): the capture hook sits on head's forward.
            logits, step_temperature = _next_logits(h, w, head, aggregation, temperature)
            how = {} if sampling is None else dict(temperature=step_temperature, top_k=sampling.top_k,
                                                   top_p=sampling.top_p)
            nxt = choose_token(logits, sampling is None, generator=sampling and sampling.generator, **how)
            if return_logprobs:
                lp = token_logprobs_under(logits, nxt, sampling is None, **how)
                logprobs.append(lp.masked_fill(finished, 0.0))
            nxt = nxt.to(dev).masked_fill(finished, policy.pad_token_id)
            tokens.append(nxt)
            finished |= nxt == policy.eos_token_id
            if stop.all_finished(finished):  # the one host sync per token (eager steps add transformers' mask check)
                # the last `lag` steps came after the longest row's end: padding only
                del tokens[len(tokens) - stop.lag:], logprobs[len(logprobs) - stop.lag:]
                break
            if t == max_new_tokens - 1:  # no forward pass for a token that will not be chosen
                break
            step = nxt.repeat(K).unsqueeze(1)
            if static is not None:
                pos = pos[:, -1:] + 1
                h = static.step(step, pos)
                continue
            if policy.is_seq2seq:
                out = model(encoder_outputs=encoder_outputs, attention_mask=attn, decoder_input_ids=step,
                            past_key_values=past, use_cache=True, **kw)
            else:
                attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
                pos = pos[:, -1:] + 1
                out = model(input_ids=step, attention_mask=attn, position_ids=pos,
                            past_key_values=past, use_cache=True, logits_to_keep=1, **kw)
            past, h = out.past_key_values, cap.value[:, -1]
    ids = torch.stack(tokens, 1)
    return Decoded(ids, response_mask(ids, policy.eos_token_id), finished,
                   torch.stack(logprobs, 1) if logprobs else None)


@torch.no_grad()
def generate_texts(policy, model, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
                   sampling: dict | None = None) -> list[str]:
    """One policy (the model as it is, in eval mode), greedy or sampled with `sampling` =
    {temperature, top_k, top_p, seed}: the seed makes a re-run draw the same samples."""
    how = None if sampling is None else Sampling(
        sampling["temperature"], sampling["top_k"], sampling["top_p"],
        device_generator(sampling["seed"], policy.device))
    texts = []
    with eval_mode(model):
        for i in range(0, len(prompts), batch_size):
            out = decode(policy, model, prompts[i:i + batch_size], max_new_tokens, sampling=how)
            texts.extend(policy.decode(out.ids))
    return texts


@contextlib.contextmanager
def eval_mode(model, dropout: bool = False):
    """The model in eval mode (train mode with `dropout`) for the block, then as it was."""
    was_training = model.training
    model.train(dropout)
    try:
        yield model
    finally:
        model.train(was_training)
