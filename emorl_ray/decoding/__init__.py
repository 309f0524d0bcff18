"""Token selection shared by every generator in the package: the k-SCST rollouts, the ensemble
decode and the loss that scores the rollouts all warp logits with the same function, so the
distribution a token was sampled from is the one its log-probability is taken under."""

from emorl_ray.decoding.sampling import SamplingWarper, choose_token, warp_logits

__all__ = ["SamplingWarper", "choose_token", "warp_logits"]
