"""Prompts tokenized as the experts saw them: the BOS token and the chat template.

A tokenizer that does not add its BOS token by itself gives prompts without one, silently, while
the experts may have been trained with it (on one zoo this cost Expert Merging 7 normalized
points). ``add_bos=true|false`` forces it; ``auto`` follows the tokenizer's and the model config's
conventions and says in the log what it decided:

- the tokenizer adds its BOS itself (Llama, Mistral, Gemma): kept;
- no BOS token (Qwen2), or BOS is the EOS token (GPT-2, GPT-NeoX: a document separator that
  their tokenizers never add): none;
- a distinct BOS token that the tokenizer does not add but the model config names as its
  ``bos_token_id``: prepended (a tokenizer whose post-processor was lost on saving);
- otherwise none.

``chat_template=true`` formats each prompt as one user turn with the tokenizer's chat template and a
generation prompt, as instruction-tuned experts are fed (Expert Merging's code formats every
prompt with its model's conversation template); the template then decides the BOS unless
``add_bos`` is forced.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from adamerge.errors import AdamergeError

log = logging.getLogger(__name__)

ADD_BOS = ("auto", True, False)


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` starts with its BOS token by itself."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def decide_bos(tokenizer, add_bos: bool | str = "auto", model_bos_id: int | None = None,
               chat_template: bool = False) -> tuple[bool | None, str]:
    """Whether prompts start with BOS (None: as the chat template writes them), and why."""
    if add_bos not in ADD_BOS:
        raise AdamergeError(f"data.add_bos={add_bos!r}; choose from auto, true, false")
    bos = tokenizer.bos_token_id
    if add_bos is True:
        if bos is None:
            raise AdamergeError("data.add_bos=true, but the tokenizer has no BOS token")
        return True, "data.add_bos=true"
    if add_bos is False:
        return False, "data.add_bos=false"
    if chat_template:
        return None, "the chat template writes it or not"
    if tokenizer_adds_bos(tokenizer):
        return True, "the tokenizer adds it itself"
    if bos is None:
        return False, "the tokenizer has no BOS token"
    if bos == tokenizer.eos_token_id:
        return False, "the tokenizer's BOS is its EOS token, which it does not add (GPT-2 style)"
    if model_bos_id == bos:
        return True, "the tokenizer does not add its BOS, but the model config names it as bos_token_id"
    return False, "the tokenizer does not add its BOS and the model config does not name it"


@dataclass
class PromptEncoder:
    """``prompt -> token ids``, BOS and chat template decided once (see the module docstring).

    A prompt longer than ``max_length`` loses the start of its text (its BOS stays), so that its
    last token, the one objectives score, is kept.
    """

    tokenizer: object
    add_bos: bool | str = "auto"
    chat_template: bool = False
    model_bos_id: int | None = None
    max_length: int = 512

    def __post_init__(self) -> None:
        if self.chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise AdamergeError("data.chat_template=true, but the tokenizer has no chat template")
        self.bos, reason = decide_bos(self.tokenizer, self.add_bos, self.model_bos_id, self.chat_template)
        verdict = {True: "start with BOS", False: "have no BOS", None: "start as the chat template writes them"}
        log.info("calibration prompts %s: %s", verdict[self.bos], reason)

    def text(self, prompt: str) -> str:
        """The prompt as the model reads it: itself, or one user turn in the chat template."""
        if not self.chat_template:
            return prompt
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)

    def __call__(self, prompt: str) -> list[int]:
        ids = list(self.tokenizer(self.text(prompt), add_special_tokens=not self.chat_template)["input_ids"])
        bos = self.tokenizer.bos_token_id
        starts = bos is not None and ids[:1] == [bos]
        if self.bos is True and not starts:
            ids, starts = [bos, *ids], True
        elif self.bos is False and starts:
            ids, starts = ids[1:], False
        keep = int(starts)
        return ids if len(ids) <= self.max_length else ids[:keep] + ids[len(ids) - self.max_length + keep :]
