"""A finished run's outputs load with the real transformers and peft calls; ``privtune export`` and ``evaluate``."""

from __future__ import annotations

import warnings

import pytest
import torch

from privtune.cli import main
from privtune.common.models import load_model, load_tokenizer
from privtune.common.offsite import EmulatorPackage, OffsiteConfig, adapter_manifest, adapter_state, plug_in
from privtune.common.text_tokenizer import ByteTokenizer
from privtune.server.run_folder import RunFolder

MODEL = "tiny-llama"
TEXT = "Of Man's first disobedience, and the fruit of that forbidden tree whose mortal taste brought death. " * 20


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An ``--out`` folder whose ``server/`` holds what a federated run leaves: emulator, aggregate, model, metrics."""
    out = tmp_path_factory.mktemp("out")
    full = load_model(MODEL).model
    cfg = OffsiteConfig(k_bottom=1, k_top=2, n_emulator=1, adapter="lora", lora_r=4, lora_alpha=8)
    package = EmulatorPackage.build(full, cfg)
    adapted = package.instantiate(seed=0)
    generator = torch.Generator().manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in adapter_state(adapted).items()}
    manifest = adapter_manifest(adapted)
    folder = RunFolder(out / "server")
    package.save(folder.root / "emulator")
    folder.save_owner_adapter("aggregate", state, manifest.to_dict())
    folder.save_model(plug_in(full, state, manifest), load_tokenizer(MODEL))
    folder.write_metrics({"config": {"model": MODEL}})
    return out, plug_in(full, state, manifest)


def ids() -> torch.Tensor:
    return torch.tensor([ByteTokenizer().encode("whose mortal taste")])


def assert_hf_folder_is(folder, plugged) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.encode("whose mortal taste", add_special_tokens=False) == ids()[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, plugged(ids()).logits, rtol=1e-5, atol=1e-5)


def test_the_runs_model_folder_loads_with_transformers_and_privtune_models(finished_run, capsys):
    out, plugged = finished_run
    assert_hf_folder_is(out / "server" / "model", plugged)
    assert main(["models", str(out / "server" / "model")]) == 0
    assert "family      llama" in capsys.readouterr().out


def test_evaluate_reads_the_runs_aggregate(finished_run, tmp_path):
    out, _ = finished_run
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "doc.txt").write_text(TEXT)
    code = main(
        [
            "evaluate",
            "--package",
            str(out / "server" / "emulator"),
            "--model",
            MODEL,
            "--adapter",
            str(out / "server" / "adapters" / "aggregate"),
            "--data",
            str(tmp_path / "text"),
            "--block-size",
            "32",
            "--eval-blocks",
            "2",
        ]
    )
    assert code == 0


def test_export_writes_a_merged_model_or_a_peft_folder(finished_run, tmp_path, capsys):
    from peft import PeftModel

    out, plugged = finished_run
    assert main(["export", str(out), "--to", str(tmp_path / "merged")]) == 0
    assert_hf_folder_is(tmp_path / "merged", plugged)

    assert main(["export", str(out / "server"), "--to", str(tmp_path / "peft"), "--peft"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(load_model(MODEL).model, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids()).logits, plugged(ids()).logits, rtol=1e-5, atol=1e-5)

    assert main(["export", str(out), "--to", str(tmp_path / "peft"), "--peft"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--to", str(tmp_path / "x")]) == 2
    assert "no adapters/ folder" in capsys.readouterr().err


def test_a_ult_runs_model_folder_keeps_the_public_table_as_its_tokenizer(tmp_path, capsys):
    from privtune.common.models import ULT_TABLE_FILE, TinySpec, tiny_model
    from privtune.common.ult.tokenizer import UltTokenizer
    from tests.common.ult.conftest import english_table

    table = english_table()
    model = tiny_model("llama", vocab_size=table.config.vocab_size, spec=TinySpec(n_layers=2, hidden=32))
    folder = RunFolder(tmp_path / "run").save_model(model, UltTokenizer(table))
    assert (folder / ULT_TABLE_FILE).exists()
    loaded = load_model(str(folder))
    assert isinstance(loaded.tokenizer, UltTokenizer) and loaded.tokenizer.table.config == table.config
    assert main(["models", str(folder)]) == 0
    assert f"vocabulary  {table.config.vocab_size}" in capsys.readouterr().out
