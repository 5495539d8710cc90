"""merge, GGUF export and the Ollama Modelfile, on a tiny run trained once for the module.

The GGUF checks read the file back two ways: transformers' GGUF loader (which undoes the q/k
permutation, so logits must match the merged model) and, when the `xllamacpp` wheel is present,
llama.cpp itself (greedy text must match transformers'), which also checks the tokenizer fields.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import complete, needs_smollm2
from habit import load_examples
from habit.data import Message
from habit.errors import HabitError
from habit.export import export_gguf, merge, modelfile, permute_qk
from habit.render import Template, prompt_text
from habit.settings import TrainSettings
from habit.training import train

PROMPTS = [
    "<|im_start|>user\nLinux Terminal<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nChess Coach<|im_end|>\n<|im_start|>assistant\n",
    "<act>: Poet\n<prompt>: the quick brown fox",
]

# Tolerances, measured on the tiny model (its logits reach about ±7, see initializer_range in
# conftest): f16 rounding of every weight moved logits by at most 0.018, Q8_0 by at most 0.55.
# The bounds leave ~3x / ~2x room; a wrong q/k permutation moves logits by several units.
F16_TOL = 5e-2
Q8_TOL = 1.0

# SmolLM2's chat template shape: a default system turn appears when the messages have none.
CHATML_WITH_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def run_dir(tiny_model, roles_csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    # lr 5e-2: three steps move the adapter far enough from zero that merging visibly matters
    train(load_examples(roles_csv), out, model=tiny_model,
          settings=TrainSettings(steps=3, lr=5e-2, batch_tokens=512, max_len=256))
    return out


@pytest.fixture(scope="module")
def merged_dir(run_dir) -> Path:
    return merge(run_dir, run_dir.parent / "merged")


@pytest.fixture(scope="module")
def merged(merged_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(merged_dir)


def logits(model, tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits[0]


def greedy(model, tokenizer, text: str, n: int = 8) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    out = []
    with torch.no_grad():
        for _ in range(n):  # no stop: compared with llama.cpp run with ignore_eos
            out.append(int(model(ids).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[out[-1]]])], dim=1)
    return out


def load_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


# ---------------------------------------------------------------- merge


def test_merged_folder_is_plain_transformers_and_equals_base_plus_adapter(run_dir, merged_dir, merged):
    from habit.adapters import load_run

    names = {p.name for p in merged_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "habit-merge.json"} <= names
    assert not any(n.startswith("adapter_") for n in names)
    model, tokenizer = merged
    assert tokenizer.chat_template  # the chat template travels with the merged model
    meta = json.loads((merged_dir / "habit-merge.json").read_text())
    info = json.loads((run_dir / "run.json").read_text())
    assert meta["base"] == info["base"] and meta["template"] == info["template"]

    run = load_run(run_dir, dtype=torch.float32)
    for text in PROMPTS:
        tuned = logits(run.model, run.tokenizer, text)
        with run.model.disable_adapter():
            base = logits(run.model, run.tokenizer, text)
        mine = logits(model, tokenizer, text)
        assert (mine - tuned).abs().max() < 1e-3
        assert (mine - base).abs().max() > 0.1  # the adapter is not a no-op


def test_merge_refuses_an_existing_folder_unless_forced(run_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(HabitError, match="already exists"):
        merge(run_dir, out)
    assert (out / "keep.txt").read_text() == "mine"
    merge(run_dir, out, force=True)
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_merge_of_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(HabitError, match="not a habit run"):
        merge(tmp_path, tmp_path / "out")


# ---------------------------------------------------------------- GGUF


def test_permutation_is_the_inverse_of_transformers_gguf_loader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    undo = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    w = np.random.default_rng(0).standard_normal((32, 24)).astype(np.float32)  # 4 heads × 8
    assert not np.array_equal(permute_qk(w, 4), w)
    np.testing.assert_array_equal(undo._reverse_permute_weights(permute_qk(w, 4), 4, 4), w)
    k = w[:16]  # 2 key/value heads × 8
    np.testing.assert_array_equal(undo._reverse_permute_weights(permute_qk(k, 2), 4, 2), k)


def test_f16_gguf_matches_the_merged_model(run_dir, merged, tmp_path):
    from gguf import GGUFReader

    path = export_gguf(run_dir, tmp_path / "tuned.gguf", ollama=True)
    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()
              if not k.startswith("tokenizer.ggml.") or k.endswith("_id") or k.endswith("model")}
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count_kv"] == 2
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.eos_token_id"] == 2
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types  # tied embeddings: llama.cpp reuses token_embd
    assert types["blk.1.attn_q.weight"] == "F16" and types["blk.1.ffn_norm.weight"] == "F32"
    assert len(types) == 2 + 2 * 9

    model, tokenizer = merged
    back = load_gguf(path)
    for text in PROMPTS:
        a, b = logits(model, tokenizer, text), logits(back, tokenizer, text)
        assert (a - b).abs().max() < F16_TOL
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./tuned.gguf\n")


def test_q8_0_gguf_from_a_merged_folder(merged_dir, merged, tmp_path):
    from gguf import GGUFReader

    path = export_gguf(merged_dir, tmp_path / "tuned-q8.gguf", dtype="q8_0")
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.ffn_down.weight"] == "Q8_0"
    assert types["output_norm.weight"] == "F32"
    model, tokenizer = merged
    back = load_gguf(path)
    for text in PROMPTS:
        assert (logits(model, tokenizer, text) - logits(back, tokenizer, text)).abs().max() < Q8_TOL


def test_export_errors(run_dir, tmp_path):
    with pytest.raises(HabitError, match="--dtype 'q4'"):
        export_gguf(run_dir, tmp_path / "x.gguf", dtype="q4")
    (tmp_path / "x.gguf").write_bytes(b"old")
    with pytest.raises(HabitError, match="already exists"):
        export_gguf(run_dir, tmp_path / "x.gguf")
    assert (tmp_path / "x.gguf").read_bytes() == b"old"
    with pytest.raises(HabitError, match="neither a habit run"):
        export_gguf(tmp_path, tmp_path / "y.gguf")
    with pytest.raises(HabitError, match="no such run"):
        export_gguf(tmp_path / "nothing", tmp_path / "y.gguf")


def test_export_refuses_an_arch_outside_the_table(tiny_model, tmp_path):
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=400, n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny_model) / name, folder / name)
    (folder / "habit-merge.json").write_text(json.dumps({"template": Template("chat", "{act}", "prompt").to_dict()}))
    with pytest.raises(HabitError, match="architecture 'gpt2' is not supported; supported: gemma3_text, llama"):
        export_gguf(folder, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf*"))


# ---------------------------------------------------------------- llama.cpp


def test_llama_cpp_continues_like_transformers(run_dir, merged, tmp_path, llama_server):
    model, tokenizer = merged
    server = llama_server(export_gguf(run_dir, tmp_path / "tuned.gguf"))
    compared = 0
    for text in PROMPTS:
        reply = complete(server, text)
        ours = greedy(model, tokenizer, text)
        # same prompt ids (the tokenizer fields: vocab, merges, pre-tokenizer, specials) ...
        assert reply["usage"]["prompt_tokens"] == len(tokenizer(text, add_special_tokens=False).input_ids)
        # ... and the same greedy continuation (a wrong q/k permutation changes it at once)
        assert reply["choices"][0]["text"] == tokenizer.decode(ours)
        first = reply["choices"][0]["logprobs"]["content"][0]
        if first["id"] == ours[0]:  # llama.cpp folds a token that ends mid-character into the next
            expected = torch.log_softmax(logits(model, tokenizer, text)[-1], -1)[ours[0]]
            assert abs(first["logprob"] - float(expected)) < F16_TOL
            compared += 1
    assert compared
    del server

    server = llama_server(export_gguf(run_dir, tmp_path / "tuned-q8.gguf", dtype="q8_0"))
    assert len(complete(server, PROMPTS[0])["choices"][0]["logprobs"]["content"]) >= 1


@pytest.mark.slow
@needs_smollm2
def test_real_model_through_llama_cpp_and_its_modelfile(roles_csv, tmp_path, llama_server):
    """SmolLM2 (the embedded model): export, llama.cpp greedy text = transformers', Modelfile."""
    from habit.adapters import load_run

    run = tmp_path / "run"
    train(load_examples(roles_csv), run, settings=TrainSettings(steps=2, max_len=256, batch_tokens=1024))
    path = export_gguf(run, tmp_path / "tuned.gguf", ollama=True)
    tuned = load_run(run, dtype=torch.float32)
    model, tokenizer = tuned.model.merge_and_unload(), tuned.tokenizer
    text = prompt_text(tuned.template, tokenizer, {"act": "Linux Terminal"})
    server = llama_server(path)
    reply = complete(server, text)
    ours = tokenizer.decode(greedy(model, tokenizer, text))
    assert reply["usage"]["prompt_tokens"] == len(tokenizer(text, add_special_tokens=False).input_ids)
    assert reply["choices"][0]["text"] == ours, (reply["choices"][0]["text"], ours)
    mf = (tmp_path / "Modelfile").read_text()
    assert "You are a helpful AI assistant named SmolLM" in mf and 'PARAMETER stop "<|im_end|>"' in mf
    assert fill(mf, "Linux Terminal") == text


# ---------------------------------------------------------------- Ollama


def go_render(template: str, prompt: str | None = None, system: str | None = None,
              messages: list[tuple[str, str]] = ()) -> str:
    """Ollama's Go text/template, for the subset habit writes: `{{ if .System }}` / `{{ else }}` /
    `{{ end }}`, `{{ range .Messages }}`, `{{ if eq .Role "user" }}` / `{{ else if eq .Role "..." }}`,
    `{{ .Prompt }}`, `{{ .System }}`, `{{ .Content }}` and `{{ "{{" }}`. Written here from Go's
    rules, independently of habit/ollama.py, so a wrong TEMPLATE cannot check itself."""
    parts = re.split(r"(\{\{.*?\}\})", template)
    pos = 0

    def block(scope: dict, until=("end",)) -> tuple[str, str]:
        nonlocal pos
        out = []
        while pos < len(parts):
            part = parts[pos]
            pos += 1
            if not part.startswith("{{"):
                out.append(part)
                continue
            action = part[2:-2].strip()
            if action in until or action.startswith("else"):
                return "".join(out), action
            if action == '"{{"':
                out.append("{{")
            elif action in (".Prompt", ".System", ".Content"):
                out.append(scope[action[1:]] or "")
            elif action.startswith("if "):
                out.append(branch(scope, action[3:]))
            elif action == "range .Messages":
                start = pos
                for role, content in scope["Messages"]:
                    pos = start
                    text, _ = block(scope | {"Role": role, "Content": content})
                    out.append(text)
                if not scope["Messages"]:
                    block(scope)
            else:
                raise AssertionError(f"unknown action {part}")
        return "".join(out), "eof"

    def branch(scope: dict, cond: str) -> str:
        taken = None
        while True:
            text, stop = block(scope)
            if taken is None and truth(scope, cond):
                taken = text
            if stop == "end":
                return taken or ""
            cond = stop[len("else"):].strip().removeprefix("if ").strip() or "true"

    def truth(scope: dict, cond: str) -> bool:
        if cond == "true":
            return True
        if cond.startswith("eq .Role "):
            return scope["Role"] == json.loads(cond[len("eq .Role "):])
        return bool(scope[cond.lstrip(".")])

    return block({"Prompt": prompt, "System": system, "Messages": list(messages)})[0]


def modelfile_template(text: str) -> str:
    return re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)


def fill(text: str, value: str) -> str:
    """What Ollama renders for one user input: `.Prompt` for a single-prompt TEMPLATE, else one
    user message in `.Messages` with no system prompt."""
    template = modelfile_template(text)
    if "{{ range .Messages }}" in template:
        return go_render(template, messages=[("user", value)])
    return go_render(template, prompt=value)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("template", [
    Template("text", "<act>: {act}\n<prompt>: ", "prompt"),
    Template("text", "{{{{raw}}}} Act as {act}.\n", "prompt"),  # a literal "{{" must survive Go
    Template("chat", "{act}", "prompt"),
    Template("chat", "Act as a {act}, please.", "prompt"),
    Template("chat", None, None),  # chat data: the user message is the prompt
])
def test_modelfile_template_renders_like_the_run(template, tokenizer):
    text = modelfile(template, tokenizer, "tuned.gguf", stop=[tokenizer.eos_token_id])
    assert text.startswith("FROM ./tuned.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0" in text
    for value in ("Linux Terminal", "Chess Coach"):
        fields = {"act": value} if template.prompt else None
        messages = None if template.prompt else [Message("user", value)]
        assert fill(text, value) == prompt_text(template, tokenizer, fields, messages)


def test_modelfile_keeps_the_default_system_turn(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = CHATML_WITH_SYSTEM
    template = Template("chat", "{act}", "prompt")
    text = modelfile(template, tokenizer, "tuned.gguf")
    assert fill(text, "Poet") == prompt_text(template, tokenizer, {"act": "Poet"})


def test_modelfile_renders_a_system_prompt_and_history_as_the_chat_template(tokenizer):
    """A chat run's TEMPLATE over .System and .Messages gives, for a two-turn conversation with and
    without a system prompt, exactly the text the model's chat template gives; the end-of-turn
    token is a stop parameter."""
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = CHATML_WITH_SYSTEM
    text = modelfile(Template("chat", None, None), tokenizer, "tuned.gguf")
    template = modelfile_template(text)
    assert "{{ range .Messages }}" in template and "{{ .System }}" in template
    assert 'PARAMETER stop "<|im_end|>"' in text
    turns = [("user", "Linux Terminal"), ("assistant", "I want you to act as a terminal."),
             ("user", "ls {{ -la }}")]  # a "{{" in content is data, not an action
    for system in (None, "You are terse."):
        chat = ([{"role": "system", "content": system}] if system else []) + \
               [{"role": r, "content": c} for r, c in turns]
        want = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert go_render(template, system=system, messages=turns) == want, system


def test_modelfile_needs_one_field_for_a_text_template(tokenizer):
    with pytest.raises(HabitError, match="one input field.*2 \\(instruction, input\\)"):
        modelfile(Template("text", "{instruction}\n{input}\n", "output"), tokenizer, "x.gguf")


# ---------------------------------------------------------------- CLI


def habit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "habit", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_cli_merge_and_export(run_dir, tmp_path):
    done = habit("merge", str(run_dir), "--out", "m", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"path": "m"}
    assert (tmp_path / "m" / "model.safetensors").is_file()

    again = habit("export", "m", "--gguf", "m/../t.gguf", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    failed = habit("export", "m", "--gguf", "t.gguf", cwd=tmp_path)  # exists, no --force
    assert failed.returncode == 2
    assert failed.stderr.strip().count("\n") == 0 and "Traceback" not in failed.stderr
    assert failed.stderr.startswith("habit: error: t.gguf: already exists")


def test_cli_help_shows_defaults(capsys):
    from habit.cli import build_parser

    for command in ("export", "merge"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
    shown = capsys.readouterr().out
    assert "(default: f16)" in shown and "--ollama" in shown and "--force" in shown
