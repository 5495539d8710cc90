"""The bad-input suite: one case a row. Each must give exit code 2, ONE line on stderr that names
the cause and where, no traceback, and leave every existing file as it was.

Runs the CLI in-process (habit.cli.main) for speed; tests/test_cli.py covers the same contract
through a real subprocess for a sample of these cases. Property-based fuzzing of the loader and
the renderer closes the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from habit import cli, models, render
from habit.data import Example, load_examples
from habit.errors import HabitError

ROLES = (FIXTURES / "data" / "roles.csv").read_bytes()
CHAT = (FIXTURES / "data" / "chat.jsonl").read_text(encoding="utf-8").splitlines()[0]
TRAIN = ["--steps", "1", "--batch-tokens", "256", "--max-len", "256"]


def chat_line(*turns) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})


# (id, {file name: bytes}, argv after "habit", texts the one error line must contain)
CASES = [
    # data files
    ("empty-file", {"d.csv": b""}, ["train", "d.csv"], ["d.csv", "empty"]),
    ("header-only", {"d.csv": b"act,prompt\n"}, ["train", "d.csv"], ["d.csv", "no rows"]),
    ("wrong-delimiter", {"d.csv": b"act;prompt\nPoet;Write.\n"},
     ["train", "d.csv", "--template", "{act}: {prompt}"], ["d.csv", "delimiter"]),
    ("missing-column", {"d.csv": b"a,b,c\n1,2,3\n"}, ["train", "d.csv"], ["d.csv", "response"]),
    ("unknown-template-field", {"d.csv": ROLES}, ["train", "d.csv", "--template", "{act} {nope}"],
     ["d.csv", "'nope'"]),
    ("template-response-not-last", {"d.csv": ROLES},
     ["train", "d.csv", "--template", "{prompt} then {act}", "--response", "prompt"], ["prompt"]),
    ("empty-response", {"d.csv": b'act,prompt\nPoet,"Write."\nChef," "\n'}, ["train", "d.csv"],
     ["d.csv:3", "'prompt'", "empty"]),
    ("non-utf8", {"d.csv": b"act,prompt\nPoet,caf\xe9\n"}, ["train", "d.csv"], ["d.csv:2", "UTF-8"]),
    ("binary", {"d.csv": b"\x00\x01\x02PK\x03\x04" * 50}, ["train", "d.csv"], ["d.csv", "binary"]),
    ("a-directory", {"dir/x.txt": b"hi"}, ["train", "dir"], ["dir"]),
    ("unknown-extension", {"d.xlsx": b"PK"}, ["train", "d.xlsx"], ["d.xlsx"]),
    ("malformed-json-line", {"d.jsonl": (CHAT + "\n{oops\n").encode()}, ["train", "d.jsonl"],
     ["d.jsonl:2", "JSON"]),
    ("json-not-a-list", {"d.json": b'{"act": "x"}'}, ["train", "d.json"], ["d.json"]),
    ("messages-wrong-role", {"d.jsonl": chat_line(("user", "hi"), ("robot", "beep")).encode()},
     ["train", "d.jsonl"], ["d.jsonl:1", "role"]),
    ("messages-wrong-order", {"d.jsonl": chat_line(("assistant", "hi"), ("user", "yo")).encode()},
     ["train", "d.jsonl"], ["d.jsonl:1", "messages[0].role"]),
    ("messages-content-not-string", {"d.jsonl": json.dumps(
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}).encode()},
     ["train", "d.jsonl"], ["d.jsonl:1", "content"]),
    ("messages-not-a-list", {"d.jsonl": b'{"messages": "hello"}\n'}, ["train", "d.jsonl"],
     ["d.jsonl:1", "messages"]),
    ("every-row-too-long", {"d.csv": b'act,prompt\nPoet,"' + b"word " * 400 + b'"\n'},
     ["train", "d.csv", "--steps", "1", "--max-len", "32", "--batch-tokens", "64"],
     ["d.csv", "--max-len 32"]),
    # models
    ("missing-model-path", {"d.csv": ROLES}, ["train", "d.csv", "--model", "./nowhere"],
     ["./nowhere", "no such"]),
    ("corrupt-gguf", {"d.csv": ROLES, "bad.gguf": b"GGUF" + os.urandom(64)},
     ["train", "d.csv", "--model", "bad.gguf"], ["bad.gguf", "GGUF"]),
    ("not-a-model-dir", {"d.csv": ROLES, "m/readme.txt": b"x"}, ["train", "d.csv", "--model", "m"],
     ["m", "config.json"]),
    # settings
    ("rank-0", {"d.csv": ROLES}, ["train", "d.csv", "--rank", "0"], ["--rank"]),
    ("negative-lr", {"d.csv": ROLES}, ["train", "d.csv", "--lr", "-0.1"], ["--lr"]),
    ("max-len-too-small", {"d.csv": ROLES}, ["train", "d.csv", "--max-len", "2"], ["--max-len"]),
    ("val-frac-too-big", {"d.csv": ROLES}, ["train", "d.csv", "--val-frac", "0.95"], ["--val-frac"]),
    ("bad-precision", {"d.csv": ROLES}, ["train", "d.csv", "--precision", "fp8"], ["--precision"]),
    ("bad-field-flag", {}, ["generate", "run", "--field", "novalue"], ["--field"]),
    ("resume-not-a-run", {"r/x": b""}, ["train", "--resume", "r"], ["r", "run.json"]),
    ("eval-not-a-run", {"r/x": b""}, ["eval", "r"], ["r", "run.json"]),
]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(argv, capsys) -> tuple[int, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.err


# Found only once the tokenizer has measured the rows, after the data summary line was printed.
LATE = {"every-row-too-long"}


def assert_one_line(code: int, err: str, needles, late: bool = False) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    if late:  # status lines may come first; the error is still one line, and the last
        assert sum(line.startswith("habit: error:") for line in lines) == 1, err
        lines = lines[-1:]
    assert len(lines) == 1, err
    assert lines[0].startswith("habit: error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("case,files,argv,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, files, argv, needles, tmp_path, tiny_model, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HABIT_CACHE", str(tmp_path / ".cache"))
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    if argv[0] == "train" and "--model" not in argv and "--resume" not in argv:
        argv = [*argv, "--model", tiny_model]
    if argv[0] == "train" and "--resume" not in argv:  # add the small-run flags the case lacks
        for flag, value in zip(TRAIN[::2], TRAIN[1::2]):
            if flag not in argv:
                argv = [*argv, flag, value]
    before = snapshot(tmp_path)
    code, err = run_cli([*argv, "--out", "run"] if argv[0] == "train" and "--resume" not in argv
                        else argv, capsys)
    assert_one_line(code, err, needles, late=case in LATE)
    assert not (tmp_path / "run").exists()
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def trained_run(tiny_model, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("bad-runs")
    (work / "d.csv").write_bytes(ROLES)
    assert cli.main(["train", str(work / "d.csv"), "--model", tiny_model, "--out",
                     str(work / "run"), *TRAIN]) == 0
    return work / "run"


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def test_existing_run_dir_is_refused(trained_run, tmp_path, tiny_model, capsys):
    run = copy_run(trained_run, tmp_path)
    before = snapshot(tmp_path)
    code, err = run_cli(["train", str(FIXTURES / "data" / "roles.csv"), "--model", tiny_model,
                         "--out", str(run), *TRAIN], capsys)
    assert_one_line(code, err, [str(run), "already exists"])
    assert snapshot(tmp_path) == before


def test_corrupt_adapter_dir(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    (run / "adapter_model.safetensors").write_bytes(b"not safetensors")
    before = snapshot(tmp_path)
    code, err = run_cli(["generate", str(run), "Poet", "--max-new-tokens", "2"], capsys)
    assert_one_line(code, err, [str(run), "adapter"])
    assert snapshot(tmp_path) == before


def test_corrupt_run_json(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    (run / "run.json").write_text("{ nope")
    code, err = run_cli(["generate", str(run), "Poet"], capsys)
    assert_one_line(code, err, ["run.json", "corrupt"])


def test_run_dir_from_another_base(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    info = json.loads((run / "run.json").read_text())
    info["base"]["sha256"] = "f" * 64
    (run / "run.json").write_text(json.dumps(info))
    code, err = run_cli(["generate", str(run), "Poet"], capsys)
    assert_one_line(code, err, [str(run), "different"])


def test_unwritable_output_dir(tmp_path, tiny_model, capsys):
    if os.geteuid() == 0:
        # root writes through permission bits; a path under a regular file is unwritable for anyone
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        out = locked / "run"
    code, err = run_cli(["train", str(FIXTURES / "data" / "roles.csv"), "--model", tiny_model,
                         "--out", str(out), *TRAIN], capsys)
    assert_one_line(code, err, [str(out)])


def test_interrupt_while_waiting_for_input_is_clean(trained_run, capsys, monkeypatch):
    def interrupted(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupted)
    code = cli.main(["chat", str(trained_run), "--max-new-tokens", "2"])
    assert code == 0 and "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------- fuzzing

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return models.load_tokenizer(models.resolve(tiny_model))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(act=TEXT, prompt=TEXT.filter(lambda s: s.strip()))
def test_render_masks_exactly_the_response_and_eos(act, prompt, tokenizer):
    """Whatever the text, the loss-carrying tokens decode to the response followed by EOS, and the
    prompt tokens before them carry none."""
    for template in (render.Template("text", "<act>: {act}\n<prompt>: ", "prompt"),
                     render.Template("chat", "{act}", "prompt")):
        ex = Example({"act": act, "prompt": prompt}, where="fuzz:1")
        enc = render.encode(ex, template, tokenizer, [tokenizer.eos_token_id])
        lossy = [t for t, m in zip(enc.ids, enc.loss) if m]
        assert lossy[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(lossy[:-1]) == prompt
        first = enc.loss.index(True)
        assert all(enc.loss[first:len(lossy) + first])  # one contiguous run
        assert not any(enc.loss[len(lossy) + first:])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".csv", ".tsv", ".json", ".jsonl"]))
def test_loader_never_raises_anything_but_habit_error(data, suffix, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / f"f{suffix}"
    path.write_bytes(data)
    try:
        table = load_examples(path)
    except HabitError as e:
        assert "\n" not in str(e)
    else:
        assert table.examples
