"""safetensors checkpoints (one file or shards listed in an index) and their assignment to a model's parameters, with
every missing, unexpected or mis-shaped tensor named: shared by ``llama.py``, ``gptq.py`` and ``dit.py``."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


def read_safetensors(directory: str | Path, stem: str) -> tuple[dict[str, torch.Tensor], dict[str, Path], Path]:
    """Read `stem.safetensors`, or the shards listed in `stem.safetensors.index.json`.

    Returns (name -> tensor, name -> the file it came from, the checkpoint file or index read).
    """
    directory = Path(directory)
    single, index = directory / f"{stem}.safetensors", directory / f"{stem}.safetensors.index.json"
    if single.is_file():
        files = [single]
        listed: dict[str, str] = {}
    elif index.is_file():
        listed = json.loads(index.read_text())["weight_map"]
        files = [directory / name for name in sorted(set(listed.values()))]
    else:
        raise FileNotFoundError(f"no {single.name} or {index.name} in {directory}")
    tensors, source = {}, {}
    for file in files:
        if not file.is_file():
            raise ValueError(f"shard {file} listed in {index} does not exist")
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                tensors[name], source[name] = f.get_tensor(name), file
    absent = sorted(name for name, shard in listed.items() if source.get(name) != directory / shard)
    if absent:
        raise ValueError(f"tensors {absent} listed in {index} are not in the shards it names")
    return tensors, source, single if single.is_file() else index


def assign_checked(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    source: dict[str, Path],
    where: Path,
    optional: frozenset[str] = frozenset(),
    ignored_suffixes: tuple[str, ...] = (),
) -> None:
    """Assign checkpoint tensors to `model`'s parameters; any missing, unexpected or mis-shaped tensor is a ValueError.

    `optional` names may be absent (a tied lm_head) and are never assigned; names ending in
    `ignored_suffixes` are dropped (stale buffers some old checkpoints carry).
    """
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(n for n in expected if n not in tensors and n not in optional)
    unexpected = sorted(n for n in tensors if n not in expected and not n.endswith(ignored_suffixes))
    wrong = [
        f"{n}: {tuple(tensors[n].shape)} in {source[n]}, model wants {expected[n]}"
        for n in expected
        if n in tensors and tuple(tensors[n].shape) != expected[n]
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing} in {where}")
    if unexpected:
        problems.append("unexpected tensors " + ", ".join(f"{n} (in {source[n]})" for n in unexpected))
    if wrong:
        problems.append("shape mismatch " + "; ".join(wrong))
    if problems:
        raise ValueError("cannot load checkpoint: " + "; ".join(problems))
    chosen = {n: tensors[n] for n in expected if n in tensors and n not in optional}
    model.load_state_dict(chosen, strict=False, assign=True)
