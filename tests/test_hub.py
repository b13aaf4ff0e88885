"""--push-to-hub against a fake HfApi (the Hub is not reachable here): checked before training, the final folder
uploaded with its card and, under LoRA, the adapter; a missing token is one error line with nothing written."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import unisd.hub
from unisd.cli import main


class FakeApi:
    """Records the calls; `token` False behaves as HfApi does without a token (whoami raises)."""

    calls: list[tuple[str, dict[str, Any]]] = []
    token = True
    uploaded: set[str] = set()

    def whoami(self) -> dict[str, Any]:
        FakeApi.calls.append(("whoami", {}))
        if not FakeApi.token:
            raise OSError("You are not logged in. Provide a token.")
        return {"name": "someone"}

    def create_repo(self, repo_id: str, **kwargs: Any) -> str:
        FakeApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs: Any) -> None:
        FakeApi.calls.append(("upload_folder", kwargs))
        folder = Path(kwargs["folder_path"])
        ignored = kwargs["ignore_patterns"]
        FakeApi.uploaded = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
                            and not any(p.relative_to(folder).match(pattern) for pattern in ignored)
                            and not str(p.relative_to(folder)).startswith(("checkpoints", "tensorboard"))}


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> type[FakeApi]:
    FakeApi.calls, FakeApi.token, FakeApi.uploaded = [], True, set()
    monkeypatch.setattr(unisd.hub, "HfApi", FakeApi)
    return FakeApi


def _train(tiny_model: Path, tiny_data: Path, out: Path, *extra: str) -> Any:
    return CliRunner().invoke(main, ["train", "--model", str(tiny_model), "--data", str(tiny_data), "--out", str(out),
                                     "--max-steps", "1", "--batch-size", "2", "--max-new-tokens", "4", *extra])


def test_the_final_folder_is_uploaded_with_its_card_and_adapter(tiny_model: Path, tiny_data: Path, tmp_path: Path,
                                                                fake_hub: type[FakeApi]) -> None:
    out = tmp_path / "run"
    result = _train(tiny_model, tiny_data, out, "--lora", "--push-to-hub", "me/tiny", "--hub-private")
    assert result.exit_code == 0, result.output
    names = [name for name, _ in fake_hub.calls]
    assert names == ["whoami", "create_repo", "upload_folder"]
    assert fake_hub.calls[1][1] == {"repo_id": "me/tiny", "private": True, "exist_ok": True}
    upload = fake_hub.calls[2][1]
    assert upload["repo_id"] == "me/tiny" and Path(upload["folder_path"]) == out
    assert {"README.md", "config.json", "model.safetensors", "unisd.json", "adapter/adapter_config.json"} <= fake_hub.uploaded
    assert not any(n.startswith("checkpoints") for n in fake_hub.uploaded) and "samples.jsonl" not in fake_hub.uploaded
    assert "pushed to https://huggingface.co/me/tiny" in result.output


def test_a_missing_token_is_one_line_before_anything_is_written(tiny_model: Path, tiny_data: Path, tmp_path: Path,
                                                                 fake_hub: type[FakeApi]) -> None:
    fake_hub.token = False
    out = tmp_path / "run"
    result = _train(tiny_model, tiny_data, out, "--push-to-hub", "me/tiny")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --push-to-hub me/tiny") and "HF_TOKEN" in lines[0]
    assert not out.exists()
    assert [name for name, _ in fake_hub.calls] == ["whoami"]
