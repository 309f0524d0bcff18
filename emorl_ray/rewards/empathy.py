"""Empathy proxy: a transparent lexicon score, no model.

What it counts, per response:
- reflective stems that put the client's experience first ("it sounds like", "you feel", ...);
- feeling words (sad, overwhelmed, lonely, ...), up to two;
- focus on the client: the share of "you/your" among first- and second-person pronouns;
- minus advice and directives ("you should", "have you tried", ...), which motivational
  interviewing counts as non-empathic.
The weighted sum is clipped to [0, 1]. It is easy to game by keyword stuffing and blind to
meaning; it stands in for a trained empathy classifier, which a real config plugs in instead.
"""

from __future__ import annotations

import re

STEMS = (
    "it sounds like", "sounds like", "it seems", "you feel", "you're feeling", "you are feeling",
    "you've been feeling", "you have been feeling", "you felt", "that must", "it must be",
    "i can imagine", "i hear", "you're worried", "you are worried", "it makes sense",
    "understandably", "no wonder", "you're carrying", "you've been carrying", "you're not alone",
    "that's a lot", "that is a lot", "you care", "you want",
)
FEELINGS = frozenset("""
sad sadness hurt hurting lonely alone isolated overwhelmed frustrated frustrating frustration scared
afraid fear fearful anxious anxiety worried worry worrying nervous ashamed shame guilty guilt angry
anger furious upset exhausted tired drained stuck hopeless helpless stressed stress heartbroken
grief grieving disappointed disappointing embarrassed rejected betrayed confused lost empty
painful pain difficult hard tough unfair resentful resentment torn uncertain insecure powerless
trapped discouraged down miserable devastated terrified panicked unappreciated invisible
""".split())
ADVICE = (
    "you should", "you need to", "you have to", "you must", "have you tried", "why don't you",
    "try to", "just try", "i suggest", "my advice", "you ought to", "don't worry", "calm down",
)
_WORD = re.compile(r"[a-z']+")


class EmpathyLexicon:
    def score_one(self, response: str) -> float:
        text = " ".join(response.lower().split())
        if not text:
            return 0.0
        words = _WORD.findall(text)
        stems = sum(text.count(s) for s in STEMS)
        feelings = sum(w in FEELINGS for w in words)
        advice = sum(text.count(a) for a in ADVICE)
        you = sum(w in ("you", "your", "you're", "you've", "yourself") for w in words)
        me = sum(w in ("i", "me", "my", "i'm", "i've", "myself") for w in words)
        focus = you / (you + me) if you + me else 0.0
        score = 0.4 * min(1.0, stems) + 0.3 * min(1.0, feelings / 2) + 0.3 * focus - 0.3 * min(1.0, advice)
        return min(1.0, max(0.0, score))

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [self.score_one(r) for r in responses]
