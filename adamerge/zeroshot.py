"""Zero-shot classification heads from CLIP's text tower, as AdaMerging's vision setup uses them.

AdaMerging (arXiv 2310.02575, Sec. 5.1) merges only the vision encoders of CLIP ViTs fine-tuned on
eight tasks; each task is classified by a frozen head built from the pretrained text tower
(Radford et al., arXiv 2103.00020, Sec. 3.1.4): every class name is put into the task's prompt
templates, the text embeddings are normalized, averaged over templates and normalized again, and
the head is ``logit_scale.exp() * embeddings``. An image's logits are that head applied to its
normalized projected image embedding.

Here the head is the ``classifier`` of a ``CLIPZeroShotClassifier`` (vision tower + visual
projection + head), so the pool treats it as an ordinary per-task head: never merged, one per
task, of each task's own size. ``ZeroShotTasks`` is the pool's ``task_model`` hook that turns the
loaded base CLIP and each loaded expert vision tower into such a classifier.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoTokenizer, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection
from transformers.modeling_outputs import ImageClassifierOutput

from adamerge.errors import AdamergeError

HEADS_FILE = "zeroshot_heads.safetensors"


class CLIPZeroShotClassifier(CLIPVisionModelWithProjection):
    """CLIP's vision tower and visual projection with a zero-shot head: ``logits = W normalize(proj(pooled))``.

    ``W`` (``classifier.weight``, ``num_labels x projection_dim``) already holds the logit scale.
    ``base_model`` is the vision tower, a plain ``CLIPVisionModel``.
    """

    heads_file = HEADS_FILE

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__(config)
        self.classifier = nn.Linear(config.projection_dim, config.num_labels, bias=False)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> ImageClassifierOutput:
        image_embeds = super().forward(pixel_values=pixel_values, **kwargs).image_embeds
        return ImageClassifierOutput(logits=self.classifier(nn.functional.normalize(image_embeds, dim=-1)))

    def save_task_heads(self, heads: Mapping[str, Mapping[str, torch.Tensor]], configs: Mapping[str, object],
                        directory: Path) -> None:
        """Write every task's head and the shared projection to ``zeroshot_heads.safetensors``.

        With the folded ``CLIPVisionModel`` beside it this reproduces task k's logits:
        ``normalize(pooler_output @ visual_projection.weight.T) @ heads[k].T``. Class names are in
        the file's metadata.
        """
        tensors = {task: head["classifier.weight"].detach().float().cpu().contiguous() for task, head in heads.items()}
        tensors["visual_projection.weight"] = self.visual_projection.weight.detach().float().cpu().contiguous()
        names = {task: [config.id2label[i] for i in range(config.num_labels)] for task, config in configs.items()}
        save_file(tensors, str(directory / HEADS_FILE), metadata={"classnames": json.dumps(names)})


def fill(template: str, classname: str) -> str:
    """A prompt: the class name in place of ``{}`` (plain replacement; configs are data, not format code)."""
    return template.replace("{}", classname)


@torch.no_grad()
def class_embeddings(clip: CLIPModel, tokenizer, classnames: Sequence[str], templates: Sequence[str],
                     batch_size: int = 256) -> torch.Tensor:
    """``(C, projection_dim)``: per class, the mean of its normalized prompt embeddings, normalized."""
    prompts = [fill(t, c) for c in classnames for t in templates]
    device, length = clip.device, clip.config.text_config.max_position_embeddings
    chunks = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start : start + batch_size], padding=True, truncation=True, max_length=length,
                        return_tensors="pt").to(device)
        chunks.append(clip.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                      .pooler_output.float())
    per_prompt = nn.functional.normalize(torch.cat(chunks), dim=-1).view(len(classnames), len(templates), -1)
    return nn.functional.normalize(per_prompt.mean(1), dim=-1)


def zeroshot_head(clip: CLIPModel, tokenizer, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """The head of one task: ``logit_scale.exp()`` times its class embeddings."""
    return clip.logit_scale.exp().float() * class_embeddings(clip, tokenizer, classnames, templates)


class ZeroShotTasks:
    """The pool's ``task_model`` hook: base CLIP and expert vision towers -> ``CLIPZeroShotClassifier``.

    Called first with the base (a full ``CLIPModel``): every task's head is computed from its text
    tower, which is then dropped; the base answers with the first task's head. Each expert (a
    ``CLIPVisionModel``, or any model with a ``vision_model``) gets the base's projection and its
    own task's head; its name is the task's name.

    Args:
        source: the base CLIP (directory or hub id), for its tokenizer.
        tasks: the expert names; each needs class names.
        classnames: task -> class names, in label order.
        templates: task -> prompt templates with ``{}`` for the class name.
    """

    def __init__(self, source: str, tasks: Sequence[str], classnames: Mapping[str, Sequence[str]],
                 templates: Mapping[str, Sequence[str]], trust_remote_code: bool = False) -> None:
        missing = [t for t in tasks if t not in classnames or t not in templates]
        if missing:
            raise AdamergeError(f"pool.zeroshot: no classnames/templates for task(s) {missing}; "
                                "set pool.zeroshot.classnames.TASK and pool.zeroshot.templates.TASK")
        empty = [t for t in tasks if not classnames[t] or not templates[t]]
        if empty:
            raise AdamergeError(f"pool.zeroshot: empty classnames or templates for task(s) {empty}")
        self.source, self.tasks, self.trust_remote_code = source, list(tasks), trust_remote_code
        self.classnames = {t: list(classnames[t]) for t in tasks}
        self.templates = {t: list(templates[t]) for t in tasks}
        self.heads: dict[str, torch.Tensor] = {}
        self.projection: nn.Linear | None = None
        self.vision_config: CLIPVisionConfig | None = None

    def __call__(self, task: str | None, model: nn.Module) -> CLIPZeroShotClassifier:
        if task is None:
            self.read_base(model)
        if self.projection is None:
            raise AdamergeError("pool.zeroshot: the base must be loaded before the experts")
        return self.classifier(task or self.tasks[0], getattr(model, "vision_model", model))

    def read_base(self, clip: nn.Module) -> None:
        if not isinstance(clip, CLIPModel):
            raise AdamergeError(f"pool.zeroshot needs a full CLIP base (vision and text towers), got "
                                f"{type(clip).__name__}; use pool.auto_class=AutoModel")
        tokenizer = AutoTokenizer.from_pretrained(self.source, trust_remote_code=self.trust_remote_code)
        self.heads = {t: zeroshot_head(clip, tokenizer, self.classnames[t], self.templates[t]).to(clip.dtype)
                      for t in self.tasks}
        self.projection = clip.visual_projection
        self.vision_config = CLIPVisionConfig(**{**clip.config.vision_config.to_dict(),
                                                 "projection_dim": clip.config.projection_dim})

    def classifier(self, task: str, vision: nn.Module) -> CLIPZeroShotClassifier:
        """The task's classifier around ``vision`` (shared, not copied), built without allocating a tower."""
        labels = dict(enumerate(self.classnames[task]))
        config = CLIPVisionConfig(**{**self.vision_config.to_dict(), "id2label": labels})
        with torch.device("meta"):
            model = CLIPZeroShotClassifier(config)
        model.vision_model, model.visual_projection = vision, self.projection
        model.classifier.weight = nn.Parameter(self.heads[task].clone(), requires_grad=False)
        return model.eval()
