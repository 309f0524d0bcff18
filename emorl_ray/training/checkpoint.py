"""A training run's checkpoint: the adapter (or the full model), the optimizer, the loop's state
and its history, with checksums so that a damaged checkpoint is found before anything is loaded
from it. Ray Train keeps `training.keep_checkpoints` of them; a resume takes the newest intact one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"      # PeftModel.from_pretrained-loadable (LoRA runs)
FULL_MODEL_DIR = "model"     # from_pretrained-loadable (full fine-tuning runs)
STATE_FILE = "state.json"
HISTORY_FILE = "history.jsonl"
OPTIMIZER_FILE = "optimizer.pt"
CHECKSUM_FILE = "checksums.json"


class CorruptCheckpoint(Exception):
    pass


def _file_digests(directory: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != CHECKSUM_FILE}


def save_checkpoint(directory: Path, model, optimizer, state: dict, history: list[dict], lora: bool) -> None:
    from safetensors.torch import save_model

    if lora:
        model.save_pretrained(directory / ADAPTER_DIR, safe_serialization=True)
    else:
        (directory / FULL_MODEL_DIR).mkdir()
        model.config.save_pretrained(directory / FULL_MODEL_DIR)
        save_model(model, str(directory / FULL_MODEL_DIR / "model.safetensors"))
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    (directory / HISTORY_FILE).write_text("".join(json.dumps(h) + "\n" for h in history))
    (directory / STATE_FILE).write_text(json.dumps(state))
    # Written last: a checkpoint whose files do not match it (truncated upload, bit rot, a copy cut
    # short) is detected before anything is loaded from it.
    (directory / CHECKSUM_FILE).write_text(json.dumps(_file_digests(directory)))


def verify_checkpoint(directory: Path) -> None:
    """Raise CorruptCheckpoint unless every file is as it was saved. Checkpoints written before
    checksums existed only need their state file."""
    if not (directory / STATE_FILE).exists():
        raise CorruptCheckpoint(f"no {STATE_FILE}")
    saved = directory / CHECKSUM_FILE
    if not saved.exists():
        return
    try:
        expected = json.loads(saved.read_text())
    except json.JSONDecodeError:
        raise CorruptCheckpoint(f"{CHECKSUM_FILE} is not valid JSON") from None
    actual = _file_digests(directory)
    bad = sorted(name for name in expected if actual.get(name) != expected[name])
    if bad:
        raise CorruptCheckpoint(f"files changed or missing since it was saved: {bad}")


def load_checkpoint(directory: Path, model, optimizer, lora: bool) -> tuple[dict, list[dict]]:
    from safetensors.torch import load_file, load_model

    verify_checkpoint(directory)
    if lora:
        from peft import set_peft_model_state_dict

        weights = load_file(str(directory / ADAPTER_DIR / "adapter_model.safetensors"))
        set_peft_model_state_dict(model, weights)
    else:
        load_model(model, str(directory / FULL_MODEL_DIR / "model.safetensors"))
    optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, weights_only=True))
    return read_state(directory)


def earlier_checkpoints(latest) -> list:
    """The run's other checkpoints in its storage (local or a URI), newest first."""
    import posixpath

    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    parent = posixpath.dirname(latest.path.rstrip("/"))
    infos = latest.filesystem.get_file_info(pafs.FileSelector(parent))
    paths = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                    and posixpath.basename(i.path).startswith("checkpoint_") and i.path != latest.path), reverse=True)
    return [Checkpoint(p, filesystem=latest.filesystem) for p in paths]


def restore(latest, model, optimizer, lora: bool, run_name: str) -> tuple[dict, list[dict]]:
    """Load the newest intact checkpoint, the one Ray Train hands back or, if that one is
    corrupt, the newest intact earlier one (Ray keeps training.keep_checkpoints of them)."""
    tried = []
    for ckpt in [latest] + earlier_checkpoints(latest):
        try:
            with ckpt.as_directory() as d:
                state, history = load_checkpoint(Path(d), model, optimizer, lora)
        except CorruptCheckpoint as e:
            log.warning("[%s] checkpoint %s is corrupt (%s); trying the one before", run_name, ckpt.path, e)
            tried.append(ckpt.path)
            continue
        if tried:  # the steps after it are trained again, exactly as before (sampling is seeded per step)
            log.warning("[%s] resuming from the earlier checkpoint %s (step %d)", run_name, ckpt.path, state["step"])
        return state, history
    raise RuntimeError(f"[{run_name}] every checkpoint of this run is corrupt ({tried}); delete the run's "
                       "Ray Train storage (<run>/ray/train-<run name>) to train it from the start")


def read_state(directory: Path) -> tuple[dict, list[dict]]:
    """The loop's state and history saved in a checkpoint directory, without loading any weights."""
    history = [json.loads(line) for line in (directory / HISTORY_FILE).read_text().splitlines() if line]
    return json.loads((directory / STATE_FILE).read_text()), history
