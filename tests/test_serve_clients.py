"""habit serve with the clients people evaluate and build with: lm-evaluation-harness
(log-likelihoods, generation), LangChain's ChatOpenAI, and structured output. The runs and the
server are test_serve.py's (its fixtures, imported)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from habit import render
from habit.adapters import load_run
from habit.serve import RAW

from test_serve import AUTH, CAP, ENV, KEY, ROLES, client, reference, request, runs, server  # noqa: F401

openai = pytest.importorskip("openai")


# ---------------------------------------------------------------- what evaluation clients need


@pytest.fixture(scope="module")
def scorer(runs):
    """Log-probabilities of each prompt token as the library computes them (one forward pass)."""
    import torch

    run = load_run(runs["roles"])

    def score(text: str, model: str = "roles") -> tuple[list[int], list[float]]:
        ids = render.prompt_ids(text, RAW, run.tokenizer)
        with torch.no_grad(), (run.model.disable_adapter() if model == "base" else contextlib.nullcontext()):
            logits = run.model(input_ids=torch.tensor([ids])).logits[0]
        logprobs = torch.log_softmax(logits.float(), -1)
        return ids, [float(logprobs[p - 1, ids[p]]) for p in range(1, len(ids))]

    return score


def test_echo_scores_the_prompt(server, scorer):
    text = "Linux Terminal: ls -la"
    ids, want = scorer(text)
    status, body, _ = request(server.port, "POST", "/v1/completions", {
        "model": "roles", "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 2}, AUTH)
    assert status == 200, body
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == text and body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                                                        "total_tokens": len(ids)}
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    assert "".join(lp["tokens"]) == text and lp["text_offset"][1] == len(lp["tokens"][0])
    assert all(len(top) <= 2 and max(top.values()) >= t - 1e-6
               for top, t in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]))
    # the same prompt as token ids, twice in one request, and on the base
    status, by_ids, _ = request(server.port, "POST", "/v1/completions", {
        "model": "base", "prompt": [ids, ids], "max_tokens": 0, "echo": True, "logprobs": 0}, AUTH)
    base = scorer(text, "base")[1]
    assert [c["index"] for c in by_ids["choices"]] == [0, 1] and base != pytest.approx(want, abs=1e-4)
    for c in by_ids["choices"]:
        assert c["text"] == text and c["logprobs"]["token_logprobs"][1:] == pytest.approx(base, abs=1e-4)


def test_generated_logprobs(client, reference):
    want = reference("roles", "Poet", 6, raw=True)[0]
    r = client.completions.create(model="roles", prompt="Poet", max_tokens=6, logprobs=5)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == want.text and "".join(lp.tokens) == want.text
    assert len(lp.tokens) == r.usage.completion_tokens - (want.finish_reason == "stop")
    for top, token, logprob in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs):
        assert 1 <= len(top) <= 5 and logprob < 0  # tokens that decode alike share a key
        assert max(top, key=top.get) == token and top[token] == pytest.approx(logprob)  # greedy
    prompt_ids = reference("roles", "Poet", 6, raw=True)[1]
    by_ids = client.completions.create(model="roles", prompt=[list(range(5, 5 + prompt_ids))], max_tokens=3)
    assert by_ids.usage.prompt_tokens == prompt_ids
    chat = client.chat.completions.create(model="roles", messages=[{"role": "user", "content": "Poet"}],
                                          max_tokens=6, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token for t in content)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="roles", messages=[{"role": "user", "content": "x"}],
                                       top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="roles", prompt="x", logprobs=6)


FIXTURES = Path(__file__).parent / "fixtures" / "lm_eval"


def test_lm_eval(server, tiny_model, tmp_path, scorer):
    """lm-evaluation-harness's local-completions model against the server: one multiple-choice
    (log-likelihood) task and one generation task, scored like the library scores them."""
    pytest.importorskip("lm_eval")
    base_url = f"http://127.0.0.1:{server.port}/v1/completions"
    args = (f"model=roles,base_url={base_url},tokenizer={tiny_model},tokenizer_backend=huggingface,"
            "num_concurrent=2,max_retries=1")
    env = dict(ENV, OPENAI_API_KEY=KEY, HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", args,
         "--tasks", "habit_tiny_mc,habit_tiny_gen", "--include_path", str(FIXTURES),
         "--batch_size", "4", "--output_path", str(tmp_path / "out"), "--log_samples"],
        cwd=FIXTURES, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    assert 0 <= results["habit_tiny_mc"]["acc,none"] <= 1
    assert 0 <= results["habit_tiny_gen"]["exact_match,none"] <= 1
    mc = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_habit_tiny_mc_*.jsonl")).open()]
    assert len(mc) == 4
    for sample in mc:  # each choice's log-likelihood is the library's, to float precision
        context = f"Question: {sample['doc']['question']}\nAnswer:"
        for choice, resp in zip(sample["doc"]["choices"], sample["resps"]):
            ids, logprobs = scorer(context + " " + choice)
            n = len(scorer(context)[0])
            assert float(resp[0][0]) == pytest.approx(sum(logprobs[n - 1:]), abs=1e-3)
    gen = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_habit_tiny_gen_*.jsonl")).open()]
    assert len(gen) == 3 and all(isinstance(s["resps"][0][0], str) for s in gen)


# ---------------------------------------------------------------- structured output

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.parametrize("model", ["base", "roles"])
def test_json_output(client, model):
    """response_format is decoded under a grammar: even a random tiny model answers valid JSON."""
    ask = dict(model=model, messages=[{"role": "user", "content": "Poet"}], max_tokens=CAP)
    free = client.chat.completions.create(**ask).choices[0].message.content
    with pytest.raises(ValueError):
        json.loads(free)  # the same model, unconstrained: not JSON
    r = client.chat.completions.create(**ask, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    person = json.loads(r.choices[0].message.content)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)
    assert isinstance(person["name"], str) and len(person["name"]) <= 12
    # json_object: any object. A random model never closes a free string, so the answer runs to
    # max_tokens; what it wrote still follows the grammar (an object, opened by a key)
    r = client.chat.completions.create(**ask, response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith('{"') and not free.startswith('{"')
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(**ask, response_format={"type": "yaml"})


def test_langchain(server, reference):
    """LangChain's ChatOpenAI: invoke, stream, batch, stop and with_structured_output."""
    langchain_openai = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    def chat(max_tokens: int):
        return langchain_openai.ChatOpenAI(model="roles", base_url=f"http://127.0.0.1:{server.port}/v1",
                                           api_key=KEY, max_tokens=max_tokens, temperature=0,
                                           max_retries=0)

    llm = chat(12)
    want = {role: reference("roles", role, 12)[0].text for role in ROLES}
    assert llm.invoke("Poet").content == want["Poet"]
    assert "".join(chunk.content for chunk in llm.stream("Chess Coach")) == want["Chess Coach"]
    assert [m.content for m in llm.batch(ROLES)] == [want[r] for r in ROLES]
    text = want["Poet"]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert llm.invoke("Poet", stop=[stop]).content == text[: text.find(stop)]

    class Person(BaseModel):
        name: str = Field(max_length=12)
        age: int

    person = chat(CAP).with_structured_output(Person, method="json_schema").invoke("Poet")
    assert isinstance(person, Person) and len(person.name) <= 12
    # json_mode (any object): a random model never closes a free string (see test_json_output),
    # so the answer is cut at max_tokens, and LangChain is told so rather than handed prose
    with pytest.raises(openai.LengthFinishReasonError) as cut:
        llm.with_structured_output(method="json_mode").invoke("Poet")
    assert cut.value.completion.choices[0].message.content.startswith('{"')


@pytest.mark.slow
def test_json_object_on_a_real_model():
    """json_object on SmolLM2-135M (the tiny model never closes a string): the grammar's answer
    ends by itself and parses."""
    import torch
    from transformers import LogitsProcessorList

    from habit import constrain
    from habit.models import load_model

    model, tok = load_model("smollm2-135m")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Describe a cat as a JSON object."}],
                                     add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids])
    stop = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    grammar_tokenizer = constrain.Tokenizers(tok, model.get_input_embeddings().weight.shape[0], stop)
    mask = constrain.Constrain([constrain.grammar({"type": "json_object"})], grammar_tokenizer.get(),
                               ids.shape[1], stop)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=64,
                         do_sample=False, eos_token_id=stop, pad_token_id=tok.pad_token_id,
                         logits_processor=LogitsProcessorList([mask]))
    new = out[0, ids.shape[1]:].tolist()
    assert new[-1] in stop
    assert isinstance(json.loads(tok.decode(new, skip_special_tokens=True)), dict)
