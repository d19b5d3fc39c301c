"""Calibration and labeled data per task: JSONL files or Hugging Face ``datasets``, tokenized with the base's
tokenizer, or, for vision models, images through the base's image processor.

Files are read as data only (``json.loads``); nothing in them is evaluated. A ``datasets`` split stays
lazy (rows, and their images, are decoded when a batch needs them). Every batch carries the
example indices so that objectives can look up cached teacher outputs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from adamerge.errors import AdamergeError
from adamerge.prompts import PromptEncoder


def load_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file (blank lines skipped); parsed as data only, never evaluated."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise AdamergeError(f"data file {str(path)!r} does not exist")
    rows: list[dict] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise AdamergeError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise AdamergeError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise AdamergeError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def load_hf_dataset(source: str, split: str = "train", name: str | None = None):
    """A local ``datasets`` directory (``save_to_disk``) or a hub id with a config name and split (lazy)."""
    import datasets

    path = Path(source).expanduser()
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        ds = datasets.load_from_disk(str(path))
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        try:
            ds = datasets.load_dataset(source, name, split=split)
        except Exception as e:  # datasets raises many types for a missing/offline source
            raise AdamergeError(f"cannot load dataset {source!r} (split {split!r}): {str(e).splitlines()[0]}") from e
    return ds


def load_dataset_examples(source: Mapping, fields: Sequence[str], task: str, limit: int | None = None):
    """``{dataset, split, name, columns: {old: new}}`` as a lazy ``datasets.Dataset`` holding ``fields``."""
    ds = load_hf_dataset(source["dataset"], source.get("split", "train"), source.get("name"))
    ds = ds.rename_columns({k: v for k, v in (source.get("columns") or {}).items() if k in ds.column_names})
    if not len(ds):
        raise AdamergeError(f"data for task {task!r} is empty")
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        raise AdamergeError(f"data for task {task!r} has no field {missing[0]!r} (it has {sorted(ds.column_names)})")
    return ds.select(range(min(limit, len(ds)))) if limit else ds


def load_task_examples(source: str | Mapping, fields: Sequence[str], task: str, limit: int | None = None,
                       integer_fields: Sequence[str] = ()) -> Sequence[Mapping]:
    """Examples of one task from a JSONL path or ``{dataset, split}``, checked to hold ``fields``.

    JSONL rows are checked whole before any model loads: each field present, text in ``fields`` and an
    integer in ``integer_fields`` (labels), so a bad row fails here and not mid-training.
    """
    if isinstance(source, Mapping):
        return load_dataset_examples(source, fields, task, limit)
    if not isinstance(source, (str, Path)):
        raise AdamergeError(f"data for task {task!r}: expected a JSONL path or {{dataset, split}}, got {source!r}")
    rows = load_jsonl(source)
    rows = rows[:limit] if limit else rows
    if not rows:
        raise AdamergeError(f"data for task {task!r} is empty")
    for i, row in enumerate(rows, 1):
        missing = [f for f in fields if f not in row]
        if missing:
            raise AdamergeError(f"data for task {task!r}: row {i} has no field {missing[0]!r} (it has {sorted(row)})")
        for f in fields:
            integral = f in integer_fields
            if not (isinstance(row[f], int) and not isinstance(row[f], bool) if integral else isinstance(row[f], str)):
                raise AdamergeError(f"data for task {task!r}: row {i} field {f!r} is {type(row[f]).__name__} "
                                    f"{row[f]!r:.40}, expected {'an integer label' if integral else 'text'}")
    return rows


class Examples(Dataset):
    def __init__(self, rows: Sequence[Mapping]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, dict]:
        return i, self.rows[i]


def left_pad(seqs: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D sequences right-aligned (left padding), so position -1 is every row's last token."""
    length = max(len(s) for s in seqs)
    device = seqs[0].device
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), length), dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, length - len(s) :] = s
        mask[i, length - len(s) :] = 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token (left padding)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's keyword arguments in a collated batch (not its ``index`` or ``labels``)."""
    keys = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "pixel_values")
    return {k: batch[k] for k in keys if k in batch}


def is_image_processor(processor) -> bool:
    return "pixel_values" in getattr(processor, "model_input_names", ())


def rgb(image):
    """Grayscale or RGBA images (MNIST, PNGs) as RGB, what CLIP-style processors expect."""
    return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image


@dataclass
class Collator:
    """Tokenize a list of ``(index, row)``: causal LMs are left-padded with explicit position ids.

    With ``answer_field`` set (supervised data) a causal LM sees prompt + answer + eos and
    ``labels`` mask the prompt and padding with -100; a classifier gets ``labels`` from ``label_field``.
    ``tokenizer`` may be an image processor: the classifier's ``field`` then holds images.
    A causal LM's prompts get their BOS and chat template as the experts saw them
    (``add_bos``, ``chat_template``, ``model_bos_id``: see ``adamerge.prompts``).
    """

    tokenizer: object
    field: str = "prompt"
    causal: bool = True
    max_length: int = 512
    answer_field: str | None = None
    label_field: str | None = None
    add_bos: bool | str = "auto"
    chat_template: bool = False
    model_bos_id: int | None = None

    def __post_init__(self) -> None:
        self.prompts = PromptEncoder(self.tokenizer, self.add_bos, self.chat_template, self.model_bos_id,
                                     self.max_length) if self.causal else None

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of a prompt; a long one loses its start, so its last token stays the scored one."""
        return torch.tensor(self.prompts(text), dtype=torch.long)

    def classifier_inputs(self, values: Sequence) -> dict[str, torch.Tensor]:
        """Images through the image processor, or text through the tokenizer (padded, truncated)."""
        if is_image_processor(self.tokenizer):
            images = self.tokenizer(images=[rgb(v) for v in values], return_tensors="pt")
            return {"pixel_values": images["pixel_values"]}
        enc = self.tokenizer(list(values), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def __call__(self, items: Sequence[tuple[int, Mapping]]) -> dict[str, torch.Tensor]:
        index = torch.tensor([i for i, _ in items])
        rows = [r for _, r in items]
        if not self.causal:
            batch = {**self.classifier_inputs([r[self.field] for r in rows]), "index": index}
            if self.label_field:
                batch["labels"] = torch.tensor([int(r[self.label_field]) for r in rows])
            return batch
        prompts = [self.encode(r[self.field]) for r in rows]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if not self.answer_field:
            ids, mask = left_pad(prompts, pad)
            return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask), "index": index}
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        answers = [torch.tensor(self.tokenizer(r[self.answer_field], add_special_tokens=False)["input_ids"] + eos)
                   for r in rows]
        ids, mask = left_pad([torch.cat([p, a]) for p, a in zip(prompts, answers, strict=True)], pad)
        labels = torch.full_like(ids, -100)
        for i, a in enumerate(answers):
            labels[i, ids.shape[1] - len(a) :] = a
        return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask),
                "labels": labels, "index": index}
