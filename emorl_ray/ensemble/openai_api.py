"""The ensemble in the shape of OpenAI's API, so any OpenAI client can call it.

    POST <route_prefix>/v1/chat/completions   {"model", "messages", ...}
    POST <route_prefix>/v1/completions        {"model", "prompt", ...}
    GET  <route_prefix>/v1/models

`model` is the run's name. Supported fields: `max_tokens` (or `max_completion_tokens`),
`temperature` (0 = greedy), `top_p`, `seed`, `n`, `stop`, `user`; the ensemble's own extension
is `weights` (an object over the objectives, a list, "auto" for the run's per-prompt router, or
"bandit" for the contextual bandit that learns from the scorers; unset: the run's searched
weights), which the OpenAI client passes as `extra_body={"weights": {...}}`. The response carries
the `weights` the decode applied. Other fields OpenAI defines but the ensemble cannot honour
(streaming, tools, logprobs, penalties, ...) are refused with a 400 naming them, not ignored.
Errors have OpenAI's shape:
{"error": {"message", "type", "param", "code"}}.

A chat request is one client turn: the ensemble was trained to answer a client statement with the
run's own system prompt (`model.system_prompt`), so it takes exactly one user message.
"""

from __future__ import annotations

import time
import uuid

from emorl_ray.ensemble import fields

# Fields of OpenAI's requests that change what would be generated; refusing them beats ignoring them.
UNSUPPORTED = ("stream", "tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs",
               "logit_bias", "presence_penalty", "frequency_penalty", "response_format", "suffix", "echo",
               "best_of", "audio", "modalities", "prediction", "reasoning_effort")
MAX_N = 8
MAX_STOP = 4


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _number(body: dict, key: str, default, kind, lo: float, hi: float):
    try:
        return fields.number(body, key, default, kind, lo, hi)
    except fields.FieldError as e:
        raise OpenAIError(400, e.message, e.field) from None


def _weights(body: dict, names: list[str], default: list[float] | None, routed: bool,
             bandit: bool) -> list[float] | str:
    w = body.get("weights")
    if (w == "auto" and routed) or (w == "bandit" and bandit):
        return w  # the per-prompt router, or the contextual bandit, picks them (emorl_ray/routing/)
    if w is None:
        if default is None:
            raise OpenAIError(400, f"weights: this run has no searched weights yet; give `weights` over {names} "
                              "(extra_body={'weights': {...}} with the OpenAI client)", "weights")
        return list(default)
    if isinstance(w, str):
        hint = {"auto": " ('auto' needs the run's router: jobs/train_router.py RUN_DIR, then restart)",
                "bandit": " ('bandit' needs jobs/serve_ensemble.py --bandit)"}.get(w, "")
        raise OpenAIError(400, f"weights: {w!r} is not available on this endpoint{hint}; give an object over "
                          f"{names} or a list of numbers (or omit it for the run's searched weights)", "weights")
    try:
        return fields.weight_vector(w, names)
    except fields.FieldError as e:
        raise OpenAIError(400, e.message, e.field) from None


def _prompt_of_messages(messages) -> str:
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, "messages: a non-empty list of {role, content} objects", "messages")
    users = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise OpenAIError(400, f"messages[{i}]: an object with a role (system, user, assistant)", "messages")
        if m["role"] != "user":
            raise OpenAIError(400, f"messages[{i}]: role {m['role']!r}: the ensemble answers one client turn "
                              "with the run's own system prompt (model.system_prompt); send one user message",
                              "messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise OpenAIError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str) or not content.strip():
            raise OpenAIError(400, f"messages[{i}].content: a non-empty string", "messages")
        users.append(content)
    if len(users) != 1:
        raise OpenAIError(400, f"messages: one user message, got {len(users)}", "messages")
    return users[0]


def parse(body, kind: str, model_name: str, names: list[str], limits, default_weights: list[float] | None,
          routed: bool = False, bandit: bool = False) -> tuple[str, list[float] | str, dict, int, list[str]]:
    """A chat (`kind` "chat") or completion request -> (prompt, weights, decode settings, n, stop).
    `weights` is "auto" or "bandit" when the request asks for the router or the bandit and the
    endpoint has it (`routed`, `bandit`)."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}  # OpenAI clients send null for "unset"
    if body.get("model") != model_name:
        raise OpenAIError(404, f"model {body.get('model')!r} does not exist; this endpoint serves {model_name!r}",
                          "model", "model_not_found")
    asked = [k for k in UNSUPPORTED if body.get(k) is not False and k in body]
    if asked:
        raise OpenAIError(400, f"{asked[0]}: not supported by the ensemble endpoint", asked[0], "unsupported_parameter")
    known = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n", "stop", "user",
             "weights", *UNSUPPORTED} | ({"messages"} if kind == "chat" else {"prompt"})
    unknown = sorted(set(body) - known)
    if unknown:
        raise OpenAIError(400, f"unknown fields {unknown}", unknown[0])
    if kind == "chat":
        prompt = _prompt_of_messages(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt.strip():
            raise OpenAIError(400, "prompt: one non-empty string", "prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise OpenAIError(400, f"prompt: longer than {limits.max_prompt_chars} characters", "prompt",
                          "context_length_exceeded")
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number(body, key, min(64, limits.max_new_tokens), int, 1, limits.max_new_tokens)
    temperature = _number(body, "temperature", 1.0, float, 0.0, 2.0)
    settings = {"max_new_tokens": max_tokens, "greedy": temperature == 0.0,
                "temperature": temperature if temperature > 0 else 1.0, "top_k": 0,
                "top_p": _number(body, "top_p", 1.0, float, 1e-6, 1.0),
                "seed": _number(body, "seed", 0, int, 0, 2**31 - 1)}
    n = _number(body, "n", 1, int, 1, min(MAX_N, limits.max_prompts))
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise OpenAIError(400, f"stop: a string or a list of at most {MAX_STOP} non-empty strings", "stop")
    return prompt, _weights(body, names, default_weights, routed, bandit), settings, n, stop


def finish(detail: dict, stop: list[str]) -> tuple[str, str]:
    """The text cut at the first stop sequence, and OpenAI's finish_reason."""
    text = detail["text"]
    cuts = [text.index(s) for s in stop if s in text]
    if cuts:
        return text[:min(cuts)], "stop"
    return text, "stop" if detail["finished"] else "length"


def response(kind: str, model_name: str, details: list[dict], stop: list[str], prompt_tokens: int,
             weights_used: dict) -> dict:
    choices = []
    for i, d in enumerate(details):
        text, reason = finish(d, stop)
        choice = {"index": i, "finish_reason": reason}
        choice |= {"message": {"role": "assistant", "content": text}} if kind == "chat" else \
            {"text": text, "logprobs": None}
        choices.append(choice)
    completion_tokens = sum(d["tokens"] for d in details)
    return {"id": ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "weights": weights_used}
