"""The CLIP ViT-B/32 AdaMerging setup (``+experiment=clip_vit_b32_adamerging``) on a tiny random CLIP.

Only the download differs: the base is a tiny ``CLIPModel`` with a character tokenizer and an image
processor saved beside it, the eight experts are its vision tower moved by small random deltas
(``CLIPVisionModel`` checkpoints, as FusionBench publishes them), and each task's test split is a
``datasets`` directory with ``image`` and ``label`` columns. The run goes through the CLI.
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoImageProcessor, CLIPConfig, CLIPModel, CLIPVisionModel, PreTrainedTokenizerFast

from adamerge.errors import AdamergeError
from adamerge.export import COEFFICIENTS_FILE, CONFIG_FILE
from adamerge.granularity import GRANULARITIES
from adamerge.loading import build_pool, build_task_vectors
from adamerge.merged import MergedModel
from adamerge.options import construct
from adamerge.zeroshot import HEADS_FILE, ZeroShotTasks

EXPERIMENT = "+experiment=clip_vit_b32_adamerging"
TASKS = ("sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")


def composed(*overrides: str):
    with initialize_config_module("adamerge.conf", version_base=None):
        return compose("config", overrides=[EXPERIMENT, *overrides])


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character between CLIP's start/end tokens, padded on the right with the end token."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    bos, eos, unk = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
    vocab = {tok: i for i, tok in enumerate([bos, eos, unk, *string.printable])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}",
                                                           special_tokens=[(bos, 0), (eos, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=eos,
                                   unk_token=unk, model_max_length=128)


def random_images(n: int, seed: int, mode: str) -> list:
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    channels = 1 if mode == "L" else 3
    shapes = [(36, 40), (32, 32), (48, 30)]  # resized and center-cropped by the processor
    return [Image.fromarray(torch.randint(0, 256, (*shapes[i % 3], channels), generator=gen, dtype=torch.uint8)
                            .squeeze(-1).numpy(), mode) for i in range(n)]


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """Local stand-ins of the hub: base CLIP (+ tokenizer, image processor), 8 experts, 8 test splits."""
    from datasets import ClassLabel, Dataset, Features, Image
    from transformers import CLIPImageProcessor

    root = tmp_path_factory.mktemp("clip_hub")
    tok = char_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=128, projection_dim=16,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=16),
        projection_dim=16,
    )
    torch.manual_seed(0)
    base = CLIPModel(config).eval()
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "base")
    classnames = composed().pool.zeroshot.classnames
    for k, task in enumerate(TASKS):
        expert = CLIPVisionModel(config.vision_config)
        expert.load_state_dict(base.vision_model.state_dict())
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(k)))
        expert.save_pretrained(root / task)
        n_classes = len(classnames[task])
        features = Features({"image": Image(), "label": ClassLabel(num_classes=n_classes)})
        images = random_images(3, seed=k, mode="L" if task == "mnist" else "RGB")
        Dataset.from_dict({"image": images, "label": [(7 * i) % n_classes for i in range(3)]},
                          features=features).save_to_disk(root / f"{task}_test")
    return root


def test_experiment_composes_with_hub_sources():
    cfg = composed()
    assert cfg.pool.base == "openai/clip-vit-base-patch32" and cfg.pool.auto_class == "AutoModel"
    assert {t: cfg.pool.experts[t] for t in TASKS} == {
        t: f"tanganke/clip-vit-base-patch32_{'stanford-cars' if t == 'cars' else t}" for t in TASKS}
    assert cfg.data.paths.cars.dataset == "tanganke/stanford_cars" and cfg.data.paths.svhn.name == "cropped_digits"
    assert [len(cfg.pool.zeroshot.classnames[t]) for t in TASKS] == [397, 196, 45, 10, 10, 43, 10, 47]
    assert (cfg.granularity.name, cfg.granularity.init, cfg.granularity.transform) == ("layer", 0.3, "clamp")
    assert (cfg.objective.name, cfg.optim.name, cfg.optim.lr, cfg.trainer.max_steps) == ("entropy", "adam", 1e-3, 500)
    assert cfg.data.batch_size == 16 and cfg.data.field == "image"
    assert OmegaConf.to_container(cfg.eval.tests, resolve=True) == OmegaConf.to_container(cfg.data.paths)


@torch.no_grad()
def independent_heads(base_dir: Path, classnames, templates) -> dict[str, torch.Tensor]:
    """Per class: CLIP text features of its prompts, normalized, averaged, normalized; times the logit scale."""
    clip = CLIPModel.from_pretrained(base_dir).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(base_dir)
    heads = {}
    for task in TASKS:
        rows = []
        for name in classnames[task]:
            enc = tok([t.replace("{}", name) for t in templates[task]], padding=True, return_tensors="pt")
            emb = torch.nn.functional.normalize(clip.get_text_features(**enc).pooler_output, dim=-1)
            rows.append(torch.nn.functional.normalize(emb.mean(0), dim=-1))
        heads[task] = clip.logit_scale.exp() * torch.stack(rows)
    return heads


def rebuilt_merge(out: Path) -> MergedModel:
    """The merged model again, from output_dir's recorded config and learned coefficients."""
    config = yaml.safe_load((out / CONFIG_FILE).read_text())
    pool = build_pool(config["pool"])
    granularity = construct(GRANULARITIES, "granularity", {**config["granularity"], "transform": "identity"})
    merged = MergedModel(pool.base, build_task_vectors(pool, config["pool"]), granularity)
    granularity.load_table(load_file(str(out / COEFFICIENTS_FILE)))
    return merged.eval()


def test_adamerging_runs_on_local_stand_ins(hub, tmp_path):
    out = tmp_path / "out"
    overrides = [EXPERIMENT, f"pool.base={hub / 'base'}", "trainer.max_steps=2", "data.batch_size=2", "logger=none",
                 "trainer.enable_progress_bar=false", "trainer.enable_checkpointing=false", f"output_dir={out}",
                 f"hydra.run.dir={tmp_path / 'run'}"]
    for task in TASKS:
        overrides += [f"pool.experts.{task}={hub / task}", f"data.paths.{task}.dataset={hub / (task + '_test')}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # as conftest
    proc = subprocess.run([sys.executable, "-m", "adamerge", *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    metrics = json.loads((out / "metrics.json").read_text())
    for when in ("before", "after"):
        assert set(metrics[when]) == {*TASKS, "avg"} and all(0.0 <= v <= 1.0 for v in metrics[when].values())

    zeroshot = composed().pool.zeroshot
    heads = load_file(str(out / HEADS_FILE))
    expected = independent_heads(hub / "base", zeroshot.classnames, zeroshot.templates)
    assert len({heads[t].shape for t in TASKS}) == 6  # 397, 196, 45, 10 (x3), 43 and 47 classes
    for task in TASKS:
        torch.testing.assert_close(heads[task], expected[task], rtol=1e-5, atol=1e-5)

    merged = rebuilt_merge(out)
    coefficients = torch.cat([c.flatten() for c in merged.granularity.table().values()])
    assert not torch.allclose(coefficients, torch.full_like(coefficients, 0.3))  # it trained
    vision = CLIPVisionModel.from_pretrained(out).eval()  # plain transformers
    processor = AutoImageProcessor.from_pretrained(out)
    pixels = processor(images=random_images(2, seed=99, mode="RGB"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embeds = vision(pixel_values=pixels).pooler_output @ heads["visual_projection.weight"].T
        for task in TASKS:
            with merged.task(task):
                reference = merged(pixel_values=pixels).logits
            folded = torch.nn.functional.normalize(embeds, dim=-1) @ heads[task].T
            torch.testing.assert_close(folded, reference, rtol=1e-5, atol=1e-5)


def test_zeroshot_needs_classnames_for_every_expert():
    with pytest.raises(AdamergeError, match=r"no classnames/templates for task\(s\) \['cifar10'\]"):
        ZeroShotTasks("base", ["mnist", "cifar10"], {"mnist": ["0"]}, {"mnist": ["{}"], "cifar10": ["{}"]})
