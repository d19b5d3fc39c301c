"""Experts whose tokenizers added tokens: merge the rows shared with the base, keep the added rows aside.

An expert fine-tuned with new tokens (chat or tool markers) has input embeddings and an output
matrix (tied or not; found with ``get_input_embeddings`` / ``get_output_embeddings``, never by
name) with more rows than the base. Tokens are matched by their STRING, never by id. The choices,
one way along the data flow (pool -> task vectors -> merged model -> fold):

- **Before any model is loaded** the pool reads the tokenizers: an expert's must hold every base
  token at the base's id (its rows line up with the base's); a reordered or changed vocabulary is
  refused, naming the first differing token. The expert's tokens that the base lacks are its
  *added tokens*, in its id order. An expert with extra rows needs its tokenizer files in its
  directory (one line says so otherwise); a hub expert's tokenizer is read once its rows show it
  needs one.
- **Loading an expert**, its vocabulary tensors are trimmed to the base's rows: those task vectors
  are merged by the normal machinery (coefficients and all). The rows of its added tokens are kept
  aside, like per-task heads; an added token without a row in the expert (a tokenizer larger than
  its embeddings) is ignored with a warning.
- **The added rows are constants, not learned**: a token added by one expert gets that expert's
  row, one added by several (same string) the mean of their rows. ``MergedModel.fold`` grows the
  folded model with ``resize_token_embeddings`` (``config.vocab_size`` follows) and writes them.
- ``pool.tokenizer`` chooses the merged vocabulary and the tokenizer written to ``output_dir``:
  ``union`` (the default; it is the base's when no expert adds a token): the base's tokenizer plus
  every added token, experts in pool order and each one's tokens in its id order, a token added by
  several experts once; ``base``: the base's vocabulary, the added rows dropped with a warning;
  an expert's name: that expert's own tokenizer (its chat template too), the tokens only other
  experts added dropped with a warning.
- **Calibration and evaluation data are tokenized with the base's tokenizer.** The merged model
  trains on the base's rows, and an added token's row is a constant no coefficient can change, so
  an added token in a prompt would teach the coefficients nothing about its own row while needing
  rows the merged model does not have during training; the base's tokenizer spells such a string
  with base tokens, as the base itself would read it. The folded checkpoint and its tokenizer hold
  the union, for the user's inference.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from adamerge.errors import AdamergeError

log = logging.getLogger(__name__)

CHOICES = ("base", "union")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def vocabulary_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters indexed by token id (rows): the input embeddings' weight and the output
    embeddings' weight and bias, tied copies once; empty for models without token embeddings."""
    try:
        inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return []
    if not isinstance(inputs, nn.Embedding):
        return []
    rows = inputs.weight.shape[0]
    wanted = [inputs.weight, getattr(outputs, "weight", None), getattr(outputs, "bias", None)]
    ids = {id(t) for t in wanted if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == rows}
    return [name for name, p in model.named_parameters() if id(p) in ids]


def has_tokenizer_files(path: Path) -> bool:
    return any((path / f).is_file() for f in TOKENIZER_FILES)


def ships_tokenizer(source: object) -> bool:
    """A local directory with tokenizer files."""
    return isinstance(source, (str, Path)) and has_tokenizer_files(Path(str(source)).expanduser())


def is_hub_id(source: object) -> bool:
    """A source given by name, not as a path that exists (``pool.is_local`` decides how it is loaded)."""
    return isinstance(source, str) and not Path(source).expanduser().exists()


def load_tokenizer(source: str | Path, trust_remote_code: bool = False):
    """``AutoTokenizer`` of a directory or hub id; ``None`` (logged) where it has none or cannot be read."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        log.warning("no tokenizer read from %s: %s", source, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


def added_tokens(base_tokenizer, tokenizer, expert: str) -> dict[str, int]:
    """The tokens ``tokenizer`` has beyond the base's (string -> its id, in id order), after checking that it
    holds every base token at the base's id."""
    vocab, base = tokenizer.get_vocab(), base_tokenizer.get_vocab()
    differing = next(((t, i) for t, i in sorted(base.items(), key=lambda item: item[1]) if vocab.get(t) != i), None)
    if differing is not None:
        token, i = differing
        theirs = next((f"{t!r}" for t, j in vocab.items() if j == i), "no token")
        raise AdamergeError(f"expert {expert!r}: its tokenizer has {theirs} at id {i} where the base has {token!r}: "
                            "a reordered or changed base vocabulary cannot be merged")
    return {t: i for t, i in sorted(vocab.items(), key=lambda item: item[1]) if t not in base}


@dataclass
class AddedRows:
    """The merged vocabulary beyond the shared rows: ``rows[name][j]`` goes to row ``ids[j]`` of vocabulary
    tensor ``name`` (a constant, not learned); the folded model gets ``size`` rows."""

    ids: list[int]
    rows: dict[str, torch.Tensor]
    size: int

    def extend(self, model: nn.Module) -> nn.Module:
        """Grow ``model`` (holding the merged shared rows) to ``size`` rows and write the added ones."""
        names = vocabulary_tensors(model)
        base_rows = dict(model.named_parameters())[names[0]].shape[0]
        if self.size > base_rows:
            model.resize_token_embeddings(self.size, mean_resizing=False)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in vocabulary_tensors(model):
                params[name][base_rows:].zero_()  # rows that no added token fills: zero, not a random init
            for name, rows in self.rows.items():
                params[name][self.ids] = rows.to(params[name].device, params[name].dtype)
        return model


class Vocabulary:
    """The base's and experts' tokenizers, each expert's added tokens, and ``pool.tokenizer``'s choice.

    ``keep_rows`` is called as each expert is loaded; ``added_rows`` and ``merged_tokenizer`` after all were.
    """

    def __init__(self, choice: str, experts: Sequence[str]) -> None:
        if choice not in (*CHOICES, *experts):
            raise AdamergeError(f"pool.tokenizer={choice!r} must be base, union or an expert's name "
                                f"({', '.join(experts)})")
        self.choice = choice
        self.base_source, self.sources, self.trust_remote_code = None, {}, False  # set by ``read``
        self.base_tokenizer = None
        self.tokenizers: dict[str, object] = {}  # expert -> its tokenizer (experts that ship one)
        self.added: dict[str, dict[str, int]] = {}  # expert -> added token -> its id in the expert
        self.kept: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # expert -> token -> tensor -> row

    def read(self, base_source, expert_sources: Mapping[str, object], trust_remote_code: bool) -> None:
        """Read the tokenizers that local experts ship and the chosen expert's (with the base's) and check them
        against the base's; a hub expert's is read once it turns out to have extra rows (``keep_rows``)."""
        self.base_source, self.sources, self.trust_remote_code = base_source, dict(expert_sources), trust_remote_code
        wanted = [name for name, source in expert_sources.items() if ships_tokenizer(source)]
        if self.choice not in (*CHOICES, *wanted):
            wanted.append(self.choice)
        for name in wanted:
            self._read_expert(name)
        if self.choice not in (*CHOICES, *self.tokenizers):
            raise AdamergeError(f"pool.tokenizer={self.choice!r}: no tokenizer read for expert {self.choice!r} "
                                "(or for the base) to compare with the base's")

    def _read_expert(self, name: str) -> None:
        """``name``'s tokenizer and added tokens, checked against the base's (read first, once); nothing where
        either has none (an in-memory model, a directory without tokenizer files)."""
        if self.base_tokenizer is None and isinstance(self.base_source, (str, Path)):
            self.base_tokenizer = load_tokenizer(self.base_source, self.trust_remote_code)
        source = self.sources[name]
        if self.base_tokenizer is None or not isinstance(source, (str, Path)):
            return
        tokenizer = load_tokenizer(source, self.trust_remote_code)
        if tokenizer is not None:
            self.tokenizers[name] = tokenizer
            self.added[name] = added_tokens(self.base_tokenizer, tokenizer, name)

    def keep_rows(self, expert: str, params: dict[str, torch.Tensor], names: Sequence[str], base_rows: int) -> None:
        """Set aside the rows of ``expert``'s added tokens and trim its vocabulary tensors (in ``params``) to
        the base's rows."""
        if not names:
            return
        rows = params[names[0]].shape[0]
        if rows > base_rows and expert not in self.tokenizers and is_hub_id(self.sources[expert]):
            self._read_expert(expert)  # downloaded with its weights
        if rows > base_rows and expert not in self.tokenizers and self.choice != "base":
            raise AdamergeError(f"expert {expert!r}: {names[0]!r} has {rows} rows, the base {base_rows}: its added "
                                "tokens need its tokenizer files in its directory (and a base with a tokenizer), "
                                "or pool.tokenizer=base to drop them")
        if rows > base_rows and expert not in self.tokenizers:
            log.warning("pool.tokenizer=base: expert %r's %d rows beyond the base's %d are dropped", expert,
                        rows - base_rows, base_rows)
        added = self.added.get(expert, {})
        missing = [t for t, i in added.items() if i >= rows]
        if missing:
            log.warning("expert %r: its tokenizer's vocabulary differs from the base's: %d added token(s) have no "
                        "embedding row in it (%s); they are ignored", expert, len(missing), ", ".join(missing[:5]))
        self.kept[expert] = {t: {n: params[n][i].detach().clone() for n in names} for t, i in added.items()
                             if i < rows}
        for n in names:
            params[n] = params[n][:base_rows]

    def merged_tokens(self) -> dict[str, int]:
        """Token -> its id in the merged tokenizer, for the added tokens that the merged vocabulary keeps (id order)."""
        tokenizer = self.merged_tokenizer()
        if tokenizer is None:
            return {}
        base = self.base_tokenizer.get_vocab()
        return {t: i for t, i in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]) if t not in base}

    def merged_tokenizer(self):
        """The tokenizer of the merged model: ``None`` where it is the base's (``base``, or ``union`` where no
        added token has a row), a copy of the chosen expert's (as it is, chat template too), or the union."""
        if self.choice != "union":
            return None if self.choice == "base" else copy.deepcopy(self.tokenizers[self.choice])
        if not any(self.kept.values()):
            return None
        from transformers import AddedToken

        tokenizer, seen = copy.deepcopy(self.base_tokenizer), set()
        for expert, kept in self.kept.items():
            decoder = getattr(self.tokenizers[expert], "added_tokens_decoder", {})
            for token in (t for t in kept if t not in seen):
                seen.add(token)
                spec = decoder.get(self.added[expert][token]) or AddedToken(token, special=False)
                tokenizer.add_tokens([spec], special_tokens=bool(getattr(spec, "special", False)))
        return tokenizer

    def added_rows(self, base_rows: int) -> AddedRows | None:
        """The constant rows of the merged vocabulary: each kept token's row, averaged over the experts that
        added it; ``None`` where the merged vocabulary is the base's."""
        everything = {t for kept in self.kept.values() for t in kept}
        targets = self.merged_tokens()
        dropped = sorted(everything - set(targets))
        if dropped:
            log.warning("pool.tokenizer=%s: %d token(s) added by experts are dropped with their embedding rows (%s)",
                        self.choice, len(dropped), ", ".join(dropped[:5]))
        if not targets:
            return None
        rowless = [t for t in targets if t not in everything]
        if rowless:
            log.warning("pool.tokenizer=%s: %d of its added token(s) have a row in no expert (%s); their rows are zero",
                        self.choice, len(rowless), ", ".join(rowless[:5]))
        tokens = [t for t in targets if t in everything]
        names = next(iter(r for kept in self.kept.values() for r in kept.values())) if tokens else {}
        rows = {n: torch.stack([mean_row(self.kept, t, n) for t in tokens]) for n in names}
        return AddedRows([targets[t] for t in tokens], rows, max(base_rows, max(targets.values()) + 1))


def mean_row(kept: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]], token: str, name: str) -> torch.Tensor:
    """Tensor ``name``'s row of ``token``: the mean over the experts that added it (in fp32, then their dtype)."""
    rows = [by_token[token][name] for by_token in kept.values() if token in by_token]
    return (torch.stack([r.float() for r in rows]).mean(0)).to(rows[0].dtype)
