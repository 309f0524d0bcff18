"""The ensemble over HTTP: per-request weights (personalisation without retraining).

POST <route_prefix>/generate with JSON
    {"prompts": "text" | ["text", ...],                  required
     "weights": {"<objective>": w, ...} | [w, ...],      required, finite, >= 0, not all zero
     "max_new_tokens": int, "greedy": bool, "temperature": float, "top_k": int, "top_p": float,
     "seed": int}
answers {"responses": [...], "weights": {...as decoded...}, "aggregation": "..."}: the weights
the decode applied, w / sum(w) (parameter aggregation: w as given).
Malformed JSON is a 400; every invalid field a 422 naming it; too many or too long prompts a 413.
Concurrent requests are batched by `@serve.batch`; requests with the same generation settings
share one decode, whatever their weights (each row decodes with its own request's weights).

The same deployment answers OpenAI-shaped requests under <route_prefix>/v1/ (`openai_api.py`).
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` type.
import asyncio
import threading

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from emorl_ray.config import config_from_dict
from emorl_ray.ensemble import fields, openai_api
from emorl_ray.ensemble.weights import check_weights

api = FastAPI(title="emorl-ray ensemble")
HTTP_APP = "emorl-ensemble-http"


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


def parse_request(body, names: list[str], limits) -> tuple[list[str], list[float], dict]:
    """Validate a request body; raises BadRequest with the field and the fix."""
    if not isinstance(body, dict):
        raise BadRequest(422, "the body must be a JSON object with `prompts` and `weights`")
    unknown = set(body) - {"prompts", "weights", "max_new_tokens", "greedy", "temperature", "top_k", "top_p", "seed"}
    if unknown:
        raise BadRequest(422, f"unknown fields {sorted(unknown)}")
    prompts = body.get("prompts")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise BadRequest(422, "prompts: a non-empty string or a non-empty list of non-empty strings")
    if len(prompts) > limits.max_prompts:
        raise BadRequest(413, f"prompts: at most {limits.max_prompts} per request, got {len(prompts)}")
    too_long = [i for i, p in enumerate(prompts) if len(p) > limits.max_prompt_chars]
    if too_long:
        raise BadRequest(413, f"prompts {too_long[:5]}: longer than {limits.max_prompt_chars} characters")
    try:
        w = fields.weight_vector(body.get("weights"), names)
        settings = {
            "max_new_tokens": fields.number(body, "max_new_tokens", min(64, limits.max_new_tokens), int, 1,
                                            limits.max_new_tokens),
            "greedy": fields.number(body, "greedy", True, bool, 0, 1),
            "temperature": fields.number(body, "temperature", 1.0, float, 1e-3, 100.0),
            "top_k": fields.number(body, "top_k", 0, int, 0, 1_000_000),
            "top_p": fields.number(body, "top_p", 1.0, float, 1e-6, 1.0),
            "seed": fields.number(body, "seed", 0, int, 0, 2**31 - 1),
        }
    except fields.FieldError as e:
        raise BadRequest(422, e.message) from None
    return list(prompts), w, settings


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(api)
class EnsembleHTTP:
    def __init__(self, experiment: dict, adapters: dict[str, str], device: str = "cpu",
                 default_weights: dict | None = None, router: str | None = None, bandit: str | None = None):
        from emorl_ray.ensemble.deployment import load_ensemble

        self.cfg = config_from_dict(experiment)
        self.ensemble = load_ensemble(self.cfg, adapters, device, self.cfg.serving.num_cpus)
        # The run's searched weights: what an OpenAI-shaped request without `weights` decodes with.
        self.default_weights = None if default_weights is None else \
            check_weights([default_weights[n] for n in self.ensemble.names], self.ensemble.names)
        # The run's per-prompt router (<run>/router), for `weights: "auto"`.
        self.router = self.embed = None
        if router is not None:
            from emorl_ray.rewards.similarity import EmbeddingSimilarity
            from emorl_ray.routing import load_router

            self.router = load_router(router)
            self.embed = EmbeddingSimilarity(self.router.encoder).embed
        # The contextual bandit, for `weights: "bandit"`: its state at `bandit`, restored if there,
        # else warm-started from the router's validation scores; rewards from the deployed scorers.
        self.bandit, self.bandit_state = None, bandit
        if bandit is not None:
            from emorl_ray import storage
            from emorl_ray.rewards.serve import ServeRewards
            from emorl_ray.routing.bandit import LinUCB, bandit_from_router

            if self.router is None:
                raise ValueError("the bandit needs the run's router (its arms and warm start)")
            self.bandit = LinUCB.load(bandit) if storage.is_file(bandit) else \
                bandit_from_router(self.router, self.cfg.search.bandit_alpha)
            self.rewards = ServeRewards(self.cfg.objective_names)
            self._bandit_lock = threading.Lock()
        self._lock = threading.Lock()

    def _decode(self, prompts, weights, s):
        with self._lock:
            return self.ensemble.generate(prompts, weights, s["max_new_tokens"], batch_size=len(prompts),
                                          greedy=s["greedy"], temperature=s["temperature"], top_k=s["top_k"],
                                          top_p=s["top_p"], seed=None if s["greedy"] else s["seed"],
                                          aggregation=self.cfg.search.aggregation, details=True)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _batched(self, requests: list[tuple]) -> list[list[dict]]:
        # Requests with the same generation settings share one decode, each prompt with its own
        # request's weights (per-row weights in one batched forward). The seed stays per request.
        groups: dict[tuple, list[int]] = {}
        for i, (_, _, s) in enumerate(requests):
            key = {**s, "seed": None} if s["greedy"] else s  # greedy decoding ignores the seed
            groups.setdefault(tuple(sorted(key.items())), []).append(i)
        out: list = [None] * len(requests)
        for idx in groups.values():
            s = requests[idx[0]][2]
            prompts = [p for i in idx for p in requests[i][0]]
            rows = [requests[i][1] for i in idx for _ in requests[i][0]]
            texts = await asyncio.to_thread(self._decode, prompts, rows, s)
            pos = 0
            for i in idx:
                n = len(requests[i][0])
                out[i], pos = texts[pos:pos + n], pos + n
        return out

    @api.post("/generate")
    async def generate(self, request: Request):
        try:
            body = await request.json()
        except Exception:
            return JSONResponse({"error": "the body is not valid JSON"}, status_code=400)
        try:
            prompts, w, settings = parse_request(body, self.ensemble.names, self.cfg.serving)
        except BadRequest as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        details = await self._batched((prompts, w, settings))
        return {"responses": [d["text"] for d in details],
                "weights": self.ensemble.weights_used(w, self.cfg.search.aggregation),
                "aggregation": self.cfg.search.aggregation}

    async def _openai(self, request: Request, kind: str):
        try:
            try:
                body = await request.json()
            except Exception:
                raise openai_api.OpenAIError(400, "the body is not valid JSON") from None
            prompt, w, settings, n, stop = openai_api.parse(body, kind, self.cfg.name, self.ensemble.names,
                                                            self.cfg.serving, self.default_weights,
                                                            routed=self.router is not None,
                                                            bandit=self.bandit is not None)
        except openai_api.OpenAIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        arm = context = None
        if w in ("auto", "bandit"):
            context = (await asyncio.to_thread(self.embed, [prompt]))[0]
            if w == "auto":
                (chosen,) = self.router.route(context[None])
            else:
                with self._bandit_lock:
                    arm = self.bandit.choose(context)
                chosen = self.bandit.weights(arm)
            w = check_weights([chosen[name] for name in self.ensemble.names], self.ensemble.names)
        details = await self._batched(([prompt] * n, w, settings))
        prompt_tokens = int(self.ensemble.policy.encode([prompt])["attention_mask"].sum())
        out = openai_api.response(kind, self.cfg.name, details, stop, prompt_tokens,
                                  self.ensemble.weights_used(w, self.cfg.search.aggregation))
        if arm is not None:  # score what was served, learn from it, keep the state
            scores = await self.rewards.ascore_all([prompt] * n, [d["text"] for d in details])
            reward = sum(sum(v) / len(v) for v in scores.values()) / len(scores)
            await asyncio.to_thread(self._learn, arm, context, reward)
            out["bandit"] = {"arm": arm, "reward": reward}
        return out

    def _learn(self, arm: int, context, reward: float) -> None:
        with self._bandit_lock:
            self.bandit.update(arm, context, reward)
            self.bandit.save(self.bandit_state)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._openai(request, "chat")

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._openai(request, "completion")

    @api.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": self.cfg.name, "object": "model", "created": 0,
                                            "owned_by": "emorl-ray", "adapters": self.ensemble.names}]}

    @api.get("/healthz")
    async def health(self):
        return {"status": "ok", "adapters": self.ensemble.names}


def deploy_http(cfg, adapters: dict[str, str], default_weights: dict | None = None, router: str | None = None,
                bandit: str | None = None):
    """`default_weights`: the run's searched weights, for OpenAI-shaped requests without `weights`;
    `router`: where the run's router is saved, for `weights: "auto"`; `bandit`: the bandit's state
    file, for `weights: "bandit"` (the scorers must be deployed; one replica owns the state)."""
    if bandit is not None and cfg.serving.num_replicas != 1:
        raise ValueError("serving.num_replicas: the bandit learns in one replica; set it to 1")
    sv = cfg.serving
    device = "cuda" if sv.num_gpus > 0 else "cpu"
    app = EnsembleHTTP.options(num_replicas=sv.num_replicas,
                               ray_actor_options={"num_cpus": sv.num_cpus, "num_gpus": sv.num_gpus}
                               ).bind(cfg.to_dict(), adapters, device, default_weights, router, bandit)
    return serve.run(app, name=HTTP_APP, route_prefix=sv.route_prefix)
