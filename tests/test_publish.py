"""``hub.repo_id``: the finished output directory goes to the Hub through ``huggingface_hub``'s ``HfApi``, here a
stub recording exactly what would be uploaded (no network); offline or failing, one line and the output intact."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from adamerge.card import model_card
from adamerge.errors import AdamergeError
from adamerge.publish import publish
from adamerge.run import run


class StubHub:
    """Stands in for the Hub behind ``HfApi``: records each call and the files an upload would send."""

    def __init__(self, fail_with: Exception | None = None) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}
        self.fail_with = fail_with

    def install(self, monkeypatch) -> StubHub:
        from huggingface_hub import HfApi, constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: self.record("create_repo", repo_id, kw))
        monkeypatch.setattr(HfApi, "create_branch", lambda api, repo_id, **kw: self.record("create_branch", repo_id,
                                                                                             kw))
        monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: self.upload(kw))
        return self

    def record(self, method: str, repo_id: str, kwargs: dict) -> str:
        if self.fail_with is not None:
            raise self.fail_with
        self.calls.append((method, {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload(self, kwargs: dict):
        from huggingface_hub import CommitInfo

        self.calls.append(("upload_folder", kwargs))
        folder = Path(kwargs["folder_path"])
        self.uploaded = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        url = f"https://huggingface.co/{kwargs['repo_id']}/commit/0123abcd"
        return CommitInfo(commit_url=url, commit_message=kwargs["commit_message"], commit_description="",
                          oid="0123abcd")


@pytest.fixture(scope="module")
def models(llama_family, tmp_path_factory, tokenizer_factory):
    base_dir, dirs = llama_family.save(tmp_path_factory.mktemp("publish"))
    tokenizer_factory(base_dir)
    return base_dir, dirs


def merge_config(models, out: Path, **hub) -> dict:
    base_dir, dirs = models
    return {"pool": {"base": str(base_dir), "experts": {k: str(v) for k, v in dirs.items()}},
            "granularity": {"name": "task", "init": 0.3}, "objective": {"name": "entropy"},
            "trainer": {"max_steps": 0}, "output_dir": str(out), "hub": hub}


def test_a_run_uploads_exactly_its_finished_output_directory(models, tmp_path, monkeypatch):
    hub = StubHub().install(monkeypatch)
    out = tmp_path / "out"
    run(merge_config(models, out, repo_id="org/merged", private=True, revision="v1"), tmp_path / "run")
    assert [name for name, _ in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[0][1] == {"repo_id": "org/merged", "private": True, "repo_type": "model", "exist_ok": True}
    assert hub.calls[1][1] == {"repo_id": "org/merged", "branch": "v1", "repo_type": "model", "exist_ok": True}
    upload = hub.calls[2][1]
    assert upload["repo_id"] == "org/merged" and upload["revision"] == "v1" and Path(upload["folder_path"]) == out
    local = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert hub.uploaded == local  # the complete output, nothing else (no temporary, no marker file)
    assert {"config.json", "model.safetensors", "README.md", "adamerge_config.yaml", "metrics.json",
            "adamerge_coefficients.safetensors", "tokenizer.json"} <= set(hub.uploaded)
    front = yaml.safe_load(hub.uploaded["README.md"].decode().split("---\n")[1])
    assert front["base_model_relation"] == "merge" and "base_model" not in front  # local paths are no hub ids
    assert {"adamerge", "merge", "task-arithmetic"} <= set(front["tags"]) and front["library_name"] == "transformers"


def test_the_card_of_an_upload_lists_the_merged_hub_models():
    card = model_card("org/base", {"math": "org/math", "code": "./experts/code", "chat": "org/chat"}, {},
                      merge_sources=["org/base", "org/math", "./experts/code", "org/chat"])
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == ["org/base", "org/math", "org/chat"] and front["base_model_relation"] == "merge"


def test_a_failed_upload_is_one_line_and_leaves_the_output_intact(models, tmp_path, monkeypatch):
    from httpx2 import Request, Response
    from huggingface_hub.errors import HfHubHTTPError
    from transformers import AutoModelForCausalLM

    url = "https://huggingface.co/api/repos/create"
    refused = HfHubHTTPError(f"401 Client Error: Unauthorized for url: {url}", response=Response(401,
                             request=Request("POST", url)))
    StubHub(fail_with=refused).install(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(AdamergeError, match=r"^hub.repo_id=org/merged: upload failed \(401 Client Error: "
                       r"Unauthorized .*\); nothing was uploaded; the output is complete in '.*out'$"):
        run(merge_config(models, out, repo_id="org/merged"), tmp_path / "run")
    AutoModelForCausalLM.from_pretrained(out)  # the local output is complete
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_offline_is_refused_before_any_request_and_a_bad_repo_id_before_loading(models, tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub = StubHub().install(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "out").mkdir()
    with pytest.raises(AdamergeError, match=r"HF_HUB_OFFLINE is set, so nothing was uploaded"):
        publish(tmp_path / "out", "org/merged")
    assert hub.calls == []
    for repo_id in ("merged", "org/../x", "org/a b"):
        config = merge_config(models, tmp_path / "never", repo_id=repo_id)
        with pytest.raises(AdamergeError, match=r"hub.repo_id=.* must be ORG/NAME"):
            run({**config, "pool": {"base": str(tmp_path / "missing"), "experts": {"a": "./a"}}}, tmp_path / "run")
    with pytest.raises(AdamergeError, match=r"unknown key hub.privat"):
        run({**merge_config(models, tmp_path / "never"), "hub": {"repo_id": "org/x", "privat": True}}, tmp_path)
