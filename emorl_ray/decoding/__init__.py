"""Every generation in the package goes through `engine.decode`: the k-SCST rollouts and
validation, the search trials, the evaluation and the HTTP endpoint; `sampling.warp_logits` is
the one definition of temperature, top-k and top-p, shared by the sampler and the k-SCST loss."""

from emorl_ray.decoding.engine import Decoded, Sampling, decode, generate_texts
from emorl_ray.decoding.sampling import choose_token, warp_logits

__all__ = ["Decoded", "Sampling", "choose_token", "decode", "generate_texts", "warp_logits"]
