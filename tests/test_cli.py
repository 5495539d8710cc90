"""The `habit` command through its real entry point (`python -m habit`, the console script).

One tiny run is trained once per module and shared. Commands that must prove the process-level
contract (exit codes, one-line errors on stderr, `--json` on stdout) run as subprocesses; a few
read-only commands on the shared run go through `habit.cli.main` in-process to save the ~4 s a
fresh interpreter spends importing torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES
from habit import cli, models

ROLES = FIXTURES / "data" / "roles.csv"
CHAT = FIXTURES / "data" / "chat.jsonl"
TRAIN_ARGS = ["--steps", "2", "--batch-tokens", "256", "--max-len", "256"]


# ---------------------------------------------------------------- helpers


def habit(*args, cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    """Run `python -m habit ARGS` in cwd, the way a user's shell would."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "100",
           "HABIT_CACHE": str(cwd / ".habit-cache")}
    return subprocess.run([sys.executable, "-m", "habit", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with a hash of its bytes ("dir" for folders)."""
    return {p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, f"rc={proc.returncode}\nstdout={proc.stdout}\nstderr={proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith("habit: error:"), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert proc.stdout == "", proc.stdout
    return line


def json_lines(text: str) -> list[dict]:
    lines = text.strip().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model) -> tuple[Path, subprocess.CompletedProcess]:
    """`habit train roles.csv --out run --json` on the tiny model, run once for the module."""
    work = tmp_path_factory.mktemp("cli")
    shutil.copy(ROLES, work / "roles.csv")
    proc = habit("train", "roles.csv", "--model", tiny_model, "--out", "run", *TRAIN_ARGS, "--json",
                 cwd=work)
    assert proc.returncode == 0, proc.stderr
    return work, proc


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    """A private copy of the trained run (plus roles.csv) in tmp_path, for tests that change it."""
    work, _ = trained
    shutil.copytree(work / "run", tmp_path / "run")
    shutil.copy(work / "roles.csv", tmp_path / "roles.csv")
    return tmp_path / "run"


# ---------------------------------------------------------------- --help


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for the top level and every sub-command, recursively."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, path + (name,))


COMMANDS = dict(_commands(cli.build_parser()))


def test_parser_has_the_documented_commands():
    for path in [("train",), ("generate",), ("compare",), ("chat",), ("data", "check"), ("data", "preview")]:
        assert path in COMMANDS


def _option_blocks(help_text: str) -> dict[str, str]:
    """Map each option string to its help entry (the option line plus its continuation lines),
    whitespace collapsed so wrapped text such as '(default:\\n 0.001)' reads as one string."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in help_text.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        if indent == 2 and line.lstrip().startswith("-"):
            current = [line]
            head = line.strip().split("  ")[0]  # "-h, --help" or "--rank RANK"
            for part in head.split(", "):
                blocks[part.split(" ")[0]] = current
        elif current is not None and indent > 2 and line.strip():
            current.append(line)
        else:
            current = None
    return {key: " ".join(" ".join(lines).split()) for key, lines in blocks.items()}


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda p: " ".join(p) or "habit")
def test_help_lists_every_option_with_its_default(path, tmp_path):
    parser = COMMANDS[path]
    proc = habit(*path, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    text = proc.stdout
    blocks = _option_blocks(text)
    options = [a for a in parser._actions if a.option_strings]
    assert options, "every parser has at least --help"
    for action in options:
        for flag in action.option_strings:
            assert flag in blocks, f"{' '.join(path)} --help does not list {flag}:\n{text}"
        entry = blocks[action.option_strings[0]]
        assert action.help, f"{action.option_strings[0]} has no help line"
        hidden = action.default in (None, False, argparse.SUPPRESS)
        if not hidden:
            assert "default" in entry, f"{action.option_strings[0]}: no default shown in {entry!r}"
            if "(default:" in entry:
                shown = entry.split("(default:", 1)[1]
                assert str(action.default) in shown, f"{action.option_strings[0]}: {entry!r}"
    for action in parser._actions:  # positionals appear in the usage and the argument list
        if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
            assert (action.metavar or action.dest) in text
            assert action.help


def test_console_script_is_the_same_entry_point(tmp_path):
    script = Path(sys.executable).parent / "habit"
    if not script.exists():
        pytest.skip("no habit console script next to this python")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, cwd=tmp_path)
    from habit import __version__

    assert proc.returncode == 0
    assert proc.stdout.strip().startswith(f"habit {__version__} (")  # (the malloc it runs on)


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name in ("train", "generate", "compare", "chat", "data"):
        assert name in out


# ---------------------------------------------------------------- train


def test_train_json_is_one_object_on_stdout(trained):
    _, proc = trained
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert isinstance(result, dict)
    assert result["run_dir"] == "run"
    assert math.isfinite(result["train_loss"]) and result["train_loss"] > 0
    assert result["val_loss"] is not None and math.isfinite(result["val_loss"])  # 5 rows → 1 held out
    assert result["tokens_per_s"] > 0
    assert result["steps"] == 2
    assert result["train_examples"] + result["val_examples"] == 5
    assert "Traceback" not in proc.stderr


def test_train_prints_no_progress_bar_when_stderr_is_not_a_terminal(trained):
    _, proc = trained
    assert "━" not in proc.stderr


def test_train_writes_a_complete_run_dir(trained, tiny_model):
    work, _ = trained
    run = work / "run"
    for name in ("adapter_config.json", "adapter_model.safetensors", "run.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints").is_dir()
    steps = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    assert steps, "no checkpoint written"
    assert (run / "checkpoints" / steps[-1] / "adapter_model.safetensors").is_file()
    assert (run / "checkpoints" / steps[-1] / "state.pt").is_file()

    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    for key in ("base", "template", "data", "settings", "versions"):
        assert key in info, key
    assert info["status"] == "done"
    assert info["base"]["source"] == tiny_model
    assert info["base"]["sha256"] == models.content_hash(models.resolve(tiny_model))
    assert info["data"]["source"] == "roles.csv"
    assert info["data"]["examples"] == 5
    assert info["settings"]["train"]["steps"] == 2
    assert info["settings"]["train"]["max_len"] == 256
    assert info["settings"]["train"]["batch_tokens"] == 256
    assert info["settings"]["lora"]["rank"] == 16
    assert {"habit", "torch", "transformers", "peft"} <= set(info["versions"])

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("step" in row for row in rows)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert any("val_loss" in r for r in rows)

    adapter = json.loads((run / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and adapter["peft_type"] == "LORA"


def test_train_refuses_an_existing_run_and_touches_nothing(run_copy, tiny_model):
    work = run_copy.parent
    before = snapshot(work)
    run_json = (run_copy / "run.json").read_bytes()
    proc = habit("train", "roles.csv", "--model", tiny_model, "--out", "run", *TRAIN_ARGS, "--json",
                 cwd=work)
    assert_one_line_error(proc, "run", "--force")
    assert (run_copy / "run.json").read_bytes() == run_json
    assert snapshot(work) == before


def test_train_force_replaces_the_run(run_copy, tiny_model):
    work = run_copy.parent
    (run_copy / "stale.txt").write_text("from an older run")
    proc = habit("train", "roles.csv", "--model", tiny_model, "--out", "run", "--steps", "1",
                 "--batch-tokens", "256", "--max-len", "256", "--force", "--json", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert json_lines(proc.stdout)[0]["steps"] == 1
    assert not (run_copy / "stale.txt").exists()
    info = json.loads((run_copy / "run.json").read_text())
    assert info["status"] == "done" and info["settings"]["train"]["steps"] == 1


# ---------------------------------------------------------------- generate / compare / data


def test_generate_json_one_object_per_input(trained):
    work, _ = trained
    proc = habit("generate", "run", "Linux Terminal", "Chess Coach", "--json", "--max-new-tokens", "5",
                 cwd=work)
    assert proc.returncode == 0, proc.stderr
    rows = json_lines(proc.stdout)
    assert [r["input"] for r in rows] == ["Linux Terminal", "Chess Coach"]
    for row in rows:
        assert isinstance(row["text"], str)
        assert row["finish_reason"] in {"stop", "length"}
        assert 1 <= row["tokens"] <= 5
        assert row["model"] == "tuned"


def test_generate_base_in_process(trained, capsys, monkeypatch):
    work, _ = trained
    monkeypatch.chdir(work)
    assert cli.main(["generate", "run", "Linux Terminal", "Chess Coach", "--base", "--json",
                     "--max-new-tokens", "5"]) == 0
    rows = json_lines(capsys.readouterr().out)
    assert [r["input"] for r in rows] == ["Linux Terminal", "Chess Coach"]
    assert all(r["model"] == "base" and r["finish_reason"] in {"stop", "length"} for r in rows)


def test_compare_json_has_base_and_tuned(trained, capsys, monkeypatch):
    work, _ = trained
    monkeypatch.chdir(work)
    assert cli.main(["compare", "run", "Linux Terminal", "--json", "--max-new-tokens", "5"]) == 0
    rows = json_lines(capsys.readouterr().out)
    assert len(rows) == 1
    row = rows[0]
    assert row["input"] == "Linux Terminal"
    for side in ("base", "tuned"):
        assert isinstance(row[side]["text"], str)
        assert row[side]["finish_reason"] in {"stop", "length"}
        assert "Linux Terminal" in row[side]["prompt"]  # rendered through the run's template


def test_data_check_json_counts(tiny_model, capsys):
    assert cli.main(["data", "check", str(ROLES), "--model", tiny_model, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == 5 and report["duplicates_dropped"] == 0
    assert report["train"] + report["val"] == 5 and report["val"] >= 1
    assert report["shape"] == "two_column" and report["columns"] == ["act", "prompt"]
    assert report["response"] == "prompt"
    assert 0 < report["loss_tokens"] < report["tokens"]
    assert report["length_min"] <= report["length_median"] <= report["length_max"]
    assert report["too_long"] == []


def test_data_preview_marks_loss_tokens(tiny_model, capsys):
    assert cli.main(["data", "preview", str(ROLES), "--model", tiny_model, "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "⟦" in out and "⟧" in out
    assert out.count("── ") == 2  # one header per example shown
    assert "Lighthouse Keeper" in out


# ---------------------------------------------------------------- error exits

GOOD_CHAT = CHAT.read_text(encoding="utf-8").splitlines()[0]
USER_USER = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"},
                                     {"role": "assistant", "content": "hello"}]})

# (id, file name, file bytes or None for "does not exist", extra flags, text the error must contain)
DATA_ERRORS = [
    ("missing-file", "missing.csv", None, [], ["missing.csv", "no such file"]),
    ("empty-file", "empty.csv", b"", [], ["empty.csv", "empty"]),
    ("header-only", "header.csv", b"act,prompt\n", [], ["header.csv", "no rows"]),
    ("template-missing-column", "roles.csv", ROLES.read_bytes(), ["--template", "{act}: {missing}"],
     ["roles.csv", "'missing'"]),
    ("empty-response", "blank.csv", b'act,prompt\nPoet,"Write verse."\nChef,""\n', [],
     ["blank.csv:3", "'prompt'", "empty"]),
    ("not-utf8", "latin1.csv", b"act,prompt\nPoet,Write verse.\nChef,caf\xe9 au lait\n", [],
     ["latin1.csv:3", "UTF-8"]),
    ("malformed-jsonl", "broken.jsonl", (GOOD_CHAT + '\n{"messages": [\n').encode(), [],
     ["broken.jsonl:2", "JSON"]),
    ("role-order", "order.jsonl", (GOOD_CHAT + "\n" + USER_USER + "\n").encode(), [],
     ["order.jsonl:2", "messages[1].role"]),
]


@pytest.mark.parametrize("name,content,flags,needles", [c[1:] for c in DATA_ERRORS],
                         ids=[c[0] for c in DATA_ERRORS])
def test_train_data_error_is_one_line_and_creates_nothing(name, content, flags, needles, tmp_path, tiny_model):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    before = snapshot(tmp_path)
    proc = habit("train", name, "--model", tiny_model, "--out", "run", *TRAIN_ARGS, *flags, cwd=tmp_path)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "runs").exists()
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("action", ["check", "preview"])
def test_data_commands_report_bad_files_in_one_line(action, tmp_path, tiny_model):
    (tmp_path / "broken.jsonl").write_bytes((GOOD_CHAT + "\n\n{oops\n").encode())
    before = snapshot(tmp_path)
    proc = habit("data", action, "broken.jsonl", "--model", tiny_model, cwd=tmp_path)
    assert_one_line_error(proc, "broken.jsonl:3", "JSON")
    assert snapshot(tmp_path) == before


SETTING_ERRORS = [
    ("rank-0", ["--rank", "0"], ["--rank"]),
    ("negative-lr", ["--lr", "-1"], ["--lr"]),
    ("max-len-too-small", ["--max-len", "4"], ["--max-len"]),
    ("batch-smaller-than-max-len", ["--max-len", "512", "--batch-tokens", "256"],
     ["--batch-tokens", "--max-len"]),
    ("unknown-flag", ["--bogus"], ["--bogus"]),
]


@pytest.mark.parametrize("flags,needles", [c[1:] for c in SETTING_ERRORS], ids=[c[0] for c in SETTING_ERRORS])
def test_train_bad_flag_is_one_line_and_creates_nothing(flags, needles, tmp_path, tiny_model):
    shutil.copy(ROLES, tmp_path / "roles.csv")
    before = snapshot(tmp_path)
    proc = habit("train", "roles.csv", "--model", tiny_model, "--out", "run", *flags, cwd=tmp_path)
    assert_one_line_error(proc, *needles)
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def bad_model_runs(tmp_path_factory) -> dict:
    """`habit train roles.csv --model BAD` once per bad model, shared by the two tests below:
    (cwd, files before, process, text the error must contain) by case."""
    cache: dict = {}

    def get(case: str):
        if case not in cache:
            work = tmp_path_factory.mktemp(f"bad-model-{case}")
            shutil.copy(ROLES, work / "roles.csv")
            if case == "nonexistent":
                model, needles = "./nope", ["./nope", "no such"]
            else:  # a folder holding a tokenizer file but no config.json
                (work / "not-a-model").mkdir()
                (work / "not-a-model" / "tokenizer.json").write_text("{}")
                model, needles = "not-a-model", ["not-a-model", "config.json"]
            before = snapshot(work)
            proc = habit("train", "roles.csv", "--model", model, "--out", "run", *TRAIN_ARGS, cwd=work)
            cache[case] = (work, before, proc, needles)
        return cache[case]

    return get


@pytest.mark.parametrize("case", ["nonexistent", "no-config"])
def test_train_bad_model_exits_2_and_creates_nothing(case, bad_model_runs):
    work, before, proc, needles = bad_model_runs(case)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("habit: error:")
    assert all(n in last for n in needles), last
    assert proc.stdout == ""
    assert snapshot(work) == before


@pytest.mark.parametrize("case", ["nonexistent", "no-config"])
def test_train_bad_model_error_is_one_line(case, bad_model_runs):
    _, _, proc, needles = bad_model_runs(case)
    assert_one_line_error(proc, *needles)


def test_generate_on_a_dir_that_is_not_a_run(tmp_path):
    (tmp_path / "notarun").mkdir()
    before = snapshot(tmp_path)
    proc = habit("generate", "notarun", "hello", "--max-new-tokens", "2", cwd=tmp_path)
    assert_one_line_error(proc, "notarun", "run.json")
    assert snapshot(tmp_path) == before


def test_generate_on_a_run_without_its_adapter(run_copy):
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (run_copy / name).unlink()
    before = snapshot(run_copy.parent)
    proc = habit("generate", "run", "Linux Terminal", "--max-new-tokens", "2", cwd=run_copy.parent)
    assert_one_line_error(proc, "run", "no adapter_config.json")
    assert snapshot(run_copy.parent) == before


def test_generate_on_a_run_without_adapter_weights(run_copy, capsys, monkeypatch):
    # in-process: the subprocess contract is covered above; this one only checks the message
    (run_copy / "adapter_model.safetensors").unlink()
    monkeypatch.chdir(run_copy.parent)
    assert cli.main(["generate", "run", "Linux Terminal", "--max-new-tokens", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("habit: error: run:")
    assert "adapter" in lines[0]


def test_generate_without_inputs_is_a_user_error(trained, capsys):
    work, _ = trained
    assert cli.main(["generate", str(work / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("habit: error:") and err.count("\n") == 1


def test_chat_answers_then_quits_on_an_empty_line(trained, capsys, monkeypatch):
    import io

    work, _ = trained
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Linux Terminal\n\n"))
    assert cli.main(["chat", "run", "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("habit chat: run (")
    assert captured.out.startswith("> ")  # the input prompt, then the streamed answer
    assert captured.out.endswith("\n> ")  # asked again after the answer; the empty line quits
