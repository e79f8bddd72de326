"""The model owner's commands take --device and refuse one that cannot be used before doing any work."""

from __future__ import annotations

import pytest
import torch

from privtune.cli import main


@pytest.mark.parametrize("command", ["prepare", "evaluate"])
def test_an_unusable_device_is_refused_before_any_work(command, tmp_path, capsys):
    out = tmp_path / "out"
    argv = {
        "prepare": ["prepare", "--model", "tiny-llama", "--no-distill", "-o", str(out)],
        "evaluate": ["evaluate", "--package", str(out), "--model", "tiny-llama"],
    }[command]
    assert main([*argv, "--device", "gpu"]) == 2
    assert "--device 'gpu' is not one of" in capsys.readouterr().err
    assert not out.exists()
    if not torch.cuda.is_available():
        assert main([*argv, "--device", "cuda:0"]) == 2
        assert "sees no CUDA device" in capsys.readouterr().err
