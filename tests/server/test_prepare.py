import json

import pytest

from privtune.cli import main
from privtune.common.corpus import Document
from privtune.common.offsite import (
    EmulatorPackage,
    TrainConfig,
    adapter_manifest,
    adapter_state,
    save_adapter,
    train_adapter,
)
from privtune.common.packing import pack
from privtune.common.text_tokenizer import ByteTokenizer

PREPARE_ARGS = [
    "--model",
    "tiny-llama",
    "--k-bottom",
    "1",
    "--k-top",
    "1",
    "--n-emulator",
    "2",
    "--distill-steps",
    "4",
    "--align-steps",
    "2",
    "--block-size",
    "32",
    "--public-data",
]
TEXT = "Of Man's first disobedience, and the fruit of that forbidden tree whose mortal taste brought death. " * 40


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def text_folder(tmp_path):
    folder = tmp_path / "text"
    folder.mkdir()
    for i in range(3):
        (folder / f"doc{i}.txt").write_text(TEXT[i * 7 :])
    return folder


def test_prepare_distils_and_writes_a_loadable_package(tmp_path, text_folder, capsys):
    out = tmp_path / "prep"
    cache = tmp_path / "cache"
    code = main(["prepare", "--distill-cache", str(cache), *PREPARE_ARGS, str(text_folder), "-o", str(out)])
    assert code == 0
    package = EmulatorPackage.load(out / "emulator")
    assert package.split.kept == [0, 1, 4, 5]
    distillation = package.manifest["distillation"]
    assert distillation["steps"] == 4 and distillation["corpus"] == "text" and "history" not in distillation
    align = distillation["align"]  # the KD-only stage that continues the main one
    assert align["steps"] == 2 and align["lm_weight"] == 0.0 and align["logit_kd_weight"] == 1.0
    quality = package.manifest["emulator_quality"]
    assert quality["ratio"] == pytest.approx(quality["emulator_ppl"] / quality["full_ppl"]) and quality["ratio"] > 0
    assert len(json.loads((out / "distillation.json").read_text())["history"]) == 4 + 2
    assert (out / "distillation.png").read_bytes().startswith(b"\x89PNG")
    reference = json.loads((out / "model.json").read_text())
    assert reference["source"] == "tiny-llama" and reference["package_hash"] == package.content_hash
    stages = list(cache.iterdir())  # each stage's distilled middle, its record and curve; no checkpoint left
    assert len(stages) == 2
    files = ["distillation.json", "distillation.png", "middle.safetensors"]
    assert all(sorted(p.name for p in cached.iterdir()) == files for cached in stages)
    printed = capsys.readouterr().out
    assert "emulator quality on held-out public text" in printed and "(resumed at 0)" in printed

    # a data owner's adapter, saved, then scored by 'privtune evaluate'
    model = package.instantiate(seed=0)
    blocks = pack([Document("d", TEXT)], ByteTokenizer(), 32)
    train_adapter(model, blocks, TrainConfig(steps=2, batch_size=2, seed=0), progress=False)
    adapter_dir = save_adapter(tmp_path / "adapter", adapter_state(model), adapter_manifest(model))
    table_path = tmp_path / "table.json"
    code = main(
        [
            "evaluate",
            "--package",
            str(out),
            "--adapter",
            str(adapter_dir),
            "--data",
            str(text_folder),
            "--block-size",
            "32",
            "--eval-blocks",
            "2",
            "--full-ft-steps",
            "1",
            "--json",
            str(table_path),
        ]
    )
    assert code == 0
    table = json.loads(table_path.read_text())
    assert set(table) == {"zero_shot", "emulator", "emulator_adapter", "plugin", "full_ft"}
    assert all(v > 1 for v in table.values())

    # the same preparation again: the distillation is read from the cache, and the package is the same
    again = tmp_path / "again"
    assert main(["prepare", "--distill-cache", str(cache), *PREPARE_ARGS, str(text_folder), "-o", str(again)]) == 0
    assert "cached in" in capsys.readouterr().out
    assert EmulatorPackage.load(again / "emulator").content_hash == package.content_hash


def test_an_interrupted_distillation_resumes_from_the_cache(tmp_path, text_folder, monkeypatch, capsys):
    from privtune.common.offsite import distill as distill_module

    cache = tmp_path / "cache"
    original = distill_module.distill_emulator

    def interrupted(*args, **kwargs):
        def stop(step, losses):
            if step == 3:
                raise KeyboardInterrupt

        return original(*args, **kwargs, on_step=stop)

    out = str(tmp_path / "p")
    argv = [
        "prepare",
        "--distill-cache",
        str(cache),
        "--checkpoint-every",
        "2",
        *PREPARE_ARGS,
        str(text_folder),
        "-o",
        out,
    ]
    monkeypatch.setattr(distill_module, "distill_emulator", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    monkeypatch.setattr(distill_module, "distill_emulator", original)
    assert main(argv) == 0
    assert "(resumed at 2)" in capsys.readouterr().out


def test_prepare_without_distillation_and_evaluate_training_here(tmp_path, text_folder):
    out = tmp_path / "prep"
    assert (
        main(
            [
                "prepare",
                "--model",
                "tiny-gpt2",
                "--k-bottom",
                "1",
                "--k-top",
                "1",
                "--n-emulator",
                "1",
                "--no-distill",
                "--adapter",
                "full",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert EmulatorPackage.load(out / "emulator").manifest["distillation"] is None
    table_path = tmp_path / "table.json"
    assert (
        main(
            [
                "evaluate",
                "--package",
                str(out / "emulator"),
                "--model",
                "tiny-gpt2",
                "--train-steps",
                "2",
                "--data",
                str(text_folder),
                "--block-size",
                "32",
                "--eval-blocks",
                "2",
                "--json",
                str(table_path),
            ]
        )
        == 0
    )
    table = json.loads(table_path.read_text())
    assert table["full_ft"] is None and table["plugin"] > 1


def test_bad_settings_end_with_a_message(tmp_path, capsys):
    assert (
        main(
            [
                "prepare",
                "--model",
                "tiny-opt",
                "--k-bottom",
                "3",
                "--k-top",
                "3",
                "--no-distill",
                "-o",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "leaves no middle block" in capsys.readouterr().err
    assert main(["evaluate", "--package", str(tmp_path / "missing"), "--model", "tiny-opt"]) == 2
    assert "not an emulator package" in capsys.readouterr().err
