"""The `habit` command: one short function per command, flags → settings → library → print.

Flags for settings come from the dataclass fields in settings.py, so each default and help line is
written once. A HabitError becomes one line on stderr and exit code 2; `--json` prints machine
output on stdout and keeps progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from habit.errors import HabitError, Interrupted
from habit.flags import data_report
from habit.flags import Help as _Help, Parser as _Parser, add_settings as _add_settings
from habit.flags import data_flags as _data_flags, settings_from as _settings, train_flags as _train_flags
from habit.settings import DEFAULT_MODEL, GenerationSettings, LoraSettings, TrainSettings

def _fields(pairs: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        name, eq, value = pair.partition("=")
        if not eq or not name:
            raise HabitError(f"--field {pair!r}: expected NAME=VALUE")
        out[name] = value
    return out


def _console():
    from rich.console import Console

    # under torchrun / accelerate launch every rank runs this CLI; only rank 0 speaks
    return Console(stderr=True, quiet=not _is_main_process())


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False), flush=True)


# ---------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    from habit import data, models, rundir
    from habit.training import train

    if args.resume:
        return _resume(args)
    if not args.data:
        raise HabitError("give a DATA file to train on (or --resume RUN)")
    lora, settings = _settings(args, LoraSettings), _settings(args, TrainSettings)
    out = args.out or os.path.join("runs", _run_name(args.data))
    rundir.check_new(out, args.force)  # before any model loads
    models.resolve(args.model)  # a bad --model fails here, in one line, before any output
    if settings.method != "sft":
        if args.template or args.response:
            raise HabitError("--template/--response read SFT tables; preference data has fixed "
                             "columns (prompt, chosen, rejected; or prompt, completion, label)")
        table = data.load_preferences(args.data)
        count = f"{len(table.records)} {'pairs' if table.shape == 'pairs' else 'labelled answers'}"
    else:
        table = data.load_examples(args.data, template=args.template, response=args.response)
        count = f"{len(table.examples)} examples, shape {table.shape}"
    console = _console()
    _malloc_tip(console)
    console.print(f"[bold]{table.source}[/]: {count}"
                  + (f", {table.duplicates} exact duplicates dropped" if table.duplicates else ""))
    with _progress(console) as (progress, task):
        on_log = _train_logger(console, progress, task)
        result = train(table, out, model=args.model, lora=lora, settings=settings,
                       force=args.force, on_log=on_log)
    _print_trained(args, console, result, settings.max_len)
    return 0


def _resume(args: argparse.Namespace) -> int:
    from habit import rundir
    from habit.training import resume

    if args.data:
        raise HabitError("--resume takes the run directory only; the data comes from its run.json")
    rundir.read_run(args.resume)  # not a run: one error line, before anything is printed
    console = _console()
    _malloc_tip(console)
    console.print(f"resuming [bold]{args.resume}[/] from its latest checkpoint")
    with _progress(console) as (progress, task):
        result = resume(args.resume, on_log=_train_logger(console, progress, task))
    _print_trained(args, console, result, None)
    return 0


def _malloc_tip(console) -> None:
    from habit import allocator

    tip = allocator.tip()
    if tip:
        console.print(f"[dim]{tip}[/]")


def _train_logger(console, progress, task):
    def on_log(row: dict) -> None:
        if "loss" in row:
            info = f"loss {row['loss']:.3f}  {row['tokens_per_s']:.0f} tok/s"
            if row.get("reward_accuracy") is not None:
                info += f"  reward acc {row['reward_accuracy']:.2f}  margin {row['margin']:.2f}"
            progress.update(task, total=row["total_steps"], completed=row["step"], info=info)
            every = max(1, row["total_steps"] // 10)
            if not console.is_terminal and (row["step"] % every == 0 or row["step"] == 1):
                console.print(f"step {row['step']}/{row['total_steps']}: {info}")
        elif "val_loss" in row:
            acc = row.get("val_reward_accuracy")
            progress.console.print(f"step {row['step']} (epoch {row['epoch']}): val loss {row['val_loss']:.4f}"
                                   + (f", reward accuracy {acc:.2f}" if acc is not None else ""))

    return on_log


def _print_trained(args, console, result, max_len: int | None) -> None:
    if result.dropped:
        console.print(f"[yellow]{len(result.dropped)} examples longer than --max-len "
                      f"{max_len} were dropped[/] (first: {result.dropped[0][0]})")
    if result.fast_check is not None and not result.fast_paths:
        console.print(f"[yellow]fast paths off[/]: on this model they differed from the plain path by "
                      f"{result.fast_check:.3g} on the first batch; training ran the plain path")
    if args.json and _is_main_process():
        _print_json(result.to_dict())
    elif not args.json:
        val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
        console.print(f"[green]done[/]: {result.run_dir}  train loss {result.train_loss:.4f}  "
                      f"val loss {val}  {result.tokens_per_s:.0f} tokens/s  {result.seconds:.0f} s")
        if result.kept_step is not None and result.kept_step != result.steps:
            console.print(f"kept the adapter of step {result.kept_step}/{result.steps}: the lowest "
                          f"validation loss ({result.kept_val_loss:.4f}); --keep last keeps the final one")
        console.print(f"next: habit compare {result.run_dir} \"<an input>\"")


def cmd_generate(args: argparse.Namespace) -> int:
    from habit.adapters import load_run
    from habit.generation import answer

    settings = _settings(args, GenerationSettings)
    fields = _fields(args.field)
    inputs = args.inputs or ([None] if args.field else [])
    if not inputs:
        raise HabitError("give at least one input (or --field NAME=VALUE)")
    run = load_run(args.run)
    for g in answer(run, inputs, settings, fields, base=args.base):
        if args.json:
            _print_json({"input": g.input, "text": g.text, "finish_reason": g.finish_reason,
                         "tokens": g.tokens, "model": "base" if args.base else "tuned"})
        else:
            print(g.text + ("" if g.finish_reason == "stop" else " […]"), flush=True)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from habit.adapters import load_run
    from habit.generation import compare

    settings = _settings(args, GenerationSettings)
    run = load_run(args.run)
    rows = compare(run, args.inputs, settings, _fields(args.field))
    if args.json:
        for row in rows:
            _print_json({"input": row["input"], "base": row["base"].to_dict(),
                         "tuned": row["tuned"].to_dict()})
        return 0
    print_comparison(rows)
    return 0


def print_comparison(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="base vs tuned", show_lines=True, expand=True)
    table.add_column("input", ratio=1)
    table.add_column("base", ratio=3)
    table.add_column("tuned", ratio=3)
    for row in rows:
        cells = [g.text.strip() + (" [dim](stopped)[/]" if g.finish_reason == "stop" else
                                   " [red](cut at the token limit)[/]") for g in (row["base"], row["tuned"])]
        table.add_row(row["input"], *cells)
    Console().print(table)


def cmd_chat(args: argparse.Namespace) -> int:
    from habit.adapters import load_run
    from habit.data import Message
    from habit.generation import build_prompt, stream

    settings = _settings(args, GenerationSettings)
    run = load_run(args.run)
    chat_mode = run.template.kind == "chat"
    fields = run.template.input_fields()
    print(f"habit chat: {args.run} ({run.template.describe()}). Empty line or Ctrl-D quits.",
          file=sys.stderr)
    history: list[Message] = []
    while True:
        try:
            line = input("> " if not fields or len(fields) == 1 else f"{fields[0]}> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line.strip():
            return 0
        if chat_mode and args.history:
            history.append(Message("user", line))
            prompt = build_prompt(run.template, run.tokenizer, messages=history)
        else:
            prompt = build_prompt(run.template, run.tokenizer, line)
        reply = []
        for piece in stream(run.model, run.tokenizer, run.template, prompt, run.stop, settings):
            if isinstance(piece, dict):
                if piece["finish_reason"] == "length":
                    print(" […]", end="")
                break
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        if chat_mode and args.history:
            history.append(Message("assistant", "".join(reply)))


def cmd_merge(args: argparse.Namespace) -> int:
    from habit.export import merge

    path = merge(args.run, args.out, force=args.force)
    if args.json:
        _print_json({"path": str(path)})
    else:
        print(f"merged model: {path}  (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from habit.export import export_gguf

    path = export_gguf(args.run, args.gguf, dtype=args.dtype, ollama=args.ollama, force=args.force)
    result = {"path": str(path)}
    if args.ollama:
        result["modelfile"] = str(path.parent / "Modelfile")
    if args.json:
        _print_json(result)
    else:
        print(f"GGUF ({args.dtype}): {path}")
        if args.ollama:
            print(f"Ollama: cd {path.parent} && ollama create NAME -f Modelfile")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from habit.adapters import load_run
    from habit.evaluate import evaluate

    from habit.tasks import parse_names

    settings = _settings(args, GenerationSettings)
    if args.tasks is None and (args.tasks_path or args.tasks_limit is not None):
        raise HabitError("--tasks-path and --tasks-limit need --tasks NAME[,NAME]")
    run = load_run(args.run)
    result = evaluate(run, data=args.data, n=args.n, expect_prefix=args.expect_prefix,
                      expect_regex=args.expect_regex, settings=settings,
                      tasks=None if args.tasks is None else parse_names(args.tasks), tasks_path=args.tasks_path or (),
                      tasks_limit=args.tasks_limit)
    report = None
    if args.report:
        from habit.report import write_report

        report = str(write_report(args.run, args.report))
    if args.json:
        _print_json({k: v for k, v in result.items() if k != "examples"} | {"report": report})
        return 0
    print_eval(result)
    if report:
        print(f"report: {report}")
    return 0


def print_eval(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    expect = result["expectation"]
    wanted = expect["prefix"] or expect["regex"] or "none"
    sides = result.get("columns") or ["base", "tuned"]  # pair data: base, the --from SFT run, tuned
    what = "held-out prompts of pairs" if "pairs" in result else "held-out examples"
    table = Table(title=f"{result['run']}: {result['n']} {what} from {result['data']}")
    for col in ["metric"] + sides:
        table.add_column(col, justify="left" if col == "metric" else "right")
    pairs = result.get("pairs")
    if pairs:
        against = "the --from SFT run" if pairs["reference"] == "sft" else "the base"
        rows = [(f"reward accuracy (vs {against}; {pairs['n']} pairs)", "reward_accuracy"),
                ("mean reward margin (beta " + _num(pairs["beta"]) + ")", "margin"),
                ("chosen log-prob per token", "logps_per_token_chosen"),
                ("rejected log-prob per token", "logps_per_token_rejected"),
                ("desirable reward (vs the reference)", "rewards_desirable"),
                ("undesirable reward", "rewards_undesirable")]
        for name, key in rows:
            if key in pairs[sides[0]]:
                table.add_row(name, *(_num(pairs[side][key]) for side in sides))
    rows = [("stop rate (ended by itself)", "stop_rate"), (f"expectation rate ({wanted!r})", "expectation_rate"),
            ("loop rate", "loop_rate"), ("similarity to reference", "similarity"),
            ("ROUGE-L", "rouge_l"), ("held-out response loss", "loss"), ("perplexity", "perplexity")]
    for name, key in rows:
        table.add_row(name, *(_num(result[side][key]) for side in sides))
    table.add_row("median length (tokens; reference "
                  f"{_num(result['reference']['length']['median'])})",
                  *(_num(result[side]["length"]["median"]) for side in sides))
    capability = result.get("capability")
    if capability:  # lm-eval tasks: did tuning cost general ability?
        table.add_section()
        for name, task in capability["tasks"].items():
            kept = "n/a" if task["retained"] is None else f"{task['retained']:.1%}"
            table.add_row(f"{name}: {task['metric']} (n={task['n']}, retained {kept})",
                          _num(task["base"]), _num(task["tuned"]))
        mean = capability["retained"]
        table.add_row("capability retained (tuned / base, mean over tasks)", "",
                      "n/a" if mean is None else f"{mean:.1%}")
    Console().print(table)
    if expect["origin"] != "given":
        print(f"expectation {expect['origin']}")


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def _plain(text: str) -> str:
    """Text shown as it is: rich would take "[bench]" in "pip install 'habit[bench]'" for markup."""
    from rich.markup import escape

    return escape(text)


def cmd_pairs(args: argparse.Namespace) -> int:
    from habit.pairs import make_pairs

    console = _console()
    summary = make_pairs(args.source, args.data, args.out, template=args.template,
                         response=args.response, settings=_settings(args, GenerationSettings),
                         n=args.n, batch_size=args.batch_size, force=args.force,
                         say=lambda line: console.print(_plain(line), highlight=False))
    if args.json:
        _print_json(summary)
        return 0
    skipped = summary["same_as_chosen"] + summary["empty"]
    console.print(f"[green]wrote[/] {summary['out']}: {summary['pairs']} pairs"
                  + (f" ({skipped} skipped: answer empty or the same as the table's)" if skipped else "")
                  + f"; {summary['rejected_cut_at_limit']} rejected answers hit --max-new-tokens")
    console.print(f"next: habit train {summary['out']} --method dpo --from SFT_RUN")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from habit.report import write_report

    path = write_report(args.run, args.out)
    if args.json:
        _print_json({"report": str(path)})
    else:
        print(f"report: {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from habit.serve import serve

    def ready(server) -> None:
        runs = ", ".join(server.model_ids[1:])
        print(f"serving {runs} (and base) on {server.url}  (compare page: {server.url}/; "
              "Ctrl-C or SIGTERM stops after in-flight requests)", file=sys.stderr, flush=True)
        if args.json:
            _print_json({"url": server.url, "models": server.model_ids})

    serve(args.runs, args.host, args.port, args.api_key, args.max_tokens_cap, ready=ready,
          max_queue=args.max_queue, runtime_adapters=args.runtime_adapters)
    return 0


def cmd_studio(args: argparse.Namespace) -> int:
    from habit.studio import serve_studio
    from habit.studio_runs import loopback

    if args.max_upload_mb <= 0:
        raise HabitError("--max-upload-mb must be positive")

    def ready(url: str) -> None:
        print(f"habit studio on {url}  (runs in {args.runs_dir}; Ctrl-C or SIGTERM stops, a "
              "training in flight saves a checkpoint first)", file=sys.stderr, flush=True)
        if args.api_key is None and not loopback(args.host):
            print(f"habit: warning: {args.host} lets other machines start trainings and read files "
                  "here; give it an --api-key", file=sys.stderr, flush=True)
        if args.json:
            _print_json({"url": url, "runs_dir": args.runs_dir})
        # on Linux only with a display: webbrowser would otherwise start a text browser in
        # this very terminal
        graphical = sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or \
            os.environ.get("WAYLAND_DISPLAY")
        if not args.no_browser and graphical:
            import webbrowser

            webbrowser.open(url)

    serve_studio(args.runs_dir, args.host, args.port, args.api_key,
                 int(args.max_upload_mb * (1 << 20)), ready=ready)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from habit import bench

    options = _settings(args, bench.BenchOptions)
    console = _console()
    result = bench.run(options, say=lambda line: console.print(f"[dim]bench[/] {_plain(line)}", highlight=False))
    if args.out:
        path = bench.write_sections(args.out, bench.markdown(result, args.out))
        console.print(f"wrote {path}")
    if args.json:
        _print_json(result)
    else:
        bench.print_result(result)
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    report = data_report(args)
    if args.json:
        _print_json(report)
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"habit data check: {report['source']}", show_header=False)
    for key, value in report.items():
        if key != "too_long":
            t.add_row(key, str(value))
    Console().print(t)
    for where, n in report.get("too_long", [])[:10]:
        print(f"  too long: {where} ({n} tokens > --max-len {report['max_len']}; dropped in training)")
    return 0


def cmd_data_preview(args: argparse.Namespace) -> int:
    from habit import data, models, render

    table = data.load_examples(args.data, template=args.template, response=args.response)
    tokenizer = models.load_tokenizer(models.resolve(args.model))
    template = render.choose_template(table, tokenizer)
    # stop ids from the tokenizer alone: preview must not load the model's weights
    stop = [tokenizer.eos_token_id]
    examples = table.examples[: args.n]
    encoded = [render.encode(ex, template, tokenizer, stop, args.train_on_prompt) for ex in examples]
    if args.json:
        for ex, enc in zip(examples, encoded):
            _print_json({"where": ex.where, "text": tokenizer.decode(enc.ids), "ids": list(enc.ids),
                         "loss": [int(x) for x in enc.loss]})
        return 0
    print(f"template: {template.describe()}")
    print("tokens inside ⟦ ⟧ carry loss (the response and its end-of-sequence token)\n")
    for ex, enc in zip(examples, encoded):
        print(f"── {ex.where}  ({len(enc)} tokens, {sum(enc.loss)} with loss)")
        print(render.show(enc, tokenizer))
        print()
    return 0


# ---------------------------------------------------------------- parser


def _run_name(data_path: str) -> str:
    stem = os.path.splitext(os.path.basename(os.path.normpath(str(data_path))))[0] or "run"
    name, n = stem, 1
    while os.path.exists(os.path.join("runs", name)):
        n += 1
        name = f"{stem}-{n}"
    return name


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="habit", formatter_class=_Help,
                     description="Teach a language model a new behaviour from a table of examples, "
                                 "with LoRA.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help: str, parent=sub) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=help, description=help, formatter_class=_Help)

    data_flags = _data_flags

    p = command("train", "train a LoRA adapter and write a run directory")
    _train_flags(p)
    p.set_defaults(func=cmd_train)

    p = command("generate", "answer inputs with a trained run (or its base)")
    p.add_argument("run", help="run directory written by 'habit train'")
    p.add_argument("inputs", nargs="*", help="inputs, e.g. a role such as 'Linux Terminal'")
    p.add_argument("--field", action="append", metavar="NAME=VALUE",
                   help="set a named template field (repeatable)")
    p.add_argument("--base", action="store_true", help="answer with the base model (adapter off)")
    _add_settings(p, GenerationSettings)
    p.add_argument("--json", action="store_true",
                   help="one JSON object per input: input, text, finish_reason, tokens")
    p.set_defaults(func=cmd_generate)

    p = command("compare", "base vs tuned answers side by side (one model load)")
    p.add_argument("run", help="run directory written by 'habit train'")
    p.add_argument("inputs", nargs="+", help="inputs to answer")
    p.add_argument("--field", action="append", metavar="NAME=VALUE",
                   help="set a named template field for every input (repeatable)")
    _add_settings(p, GenerationSettings)
    p.add_argument("--json", action="store_true", help="one JSON object per input")
    p.set_defaults(func=cmd_compare)

    p = command("chat", "talk to a run interactively, tokens streamed as they come")
    p.add_argument("run", help="run directory written by 'habit train'")
    p.add_argument("--history", action="store_true",
                   help="keep earlier turns in the prompt (chat-template runs only)")
    _add_settings(p, GenerationSettings)
    p.set_defaults(func=cmd_chat)

    p = command("eval", "measure the behaviour change: base vs tuned on held-out examples")
    p.add_argument("run", help="run directory written by 'habit train'")
    p.add_argument("--data", help="evaluate on this file instead of the run's validation split")
    p.add_argument("--n", type=int, default=50, help="how many held-out examples to generate for")
    p.add_argument("--expect-prefix", help="answers should begin with this (case and spacing ignored; "
                                           "default: the opening most training responses share)")
    p.add_argument("--expect-regex", help="answers should match this regular expression")
    p.add_argument("--tasks", metavar="NAME[,NAME]",
                   help="also run lm-evaluation-harness tasks on base and tuned (capability retained): "
                        "habit's own habit_mc and habit_gen, tasks in --tasks-path, or lm-eval's "
                        "built-in tasks whose data is local")
    p.add_argument("--tasks-path", action="append", metavar="DIR",
                   help="a folder of lm-eval task YAMLs (and their data files) for --tasks (repeatable)")
    p.add_argument("--tasks-limit", type=int, metavar="N",
                   help="score at most N documents per task (default: all)")
    _add_settings(p, GenerationSettings)
    p.add_argument("--report", metavar="FILE", help="also write the HTML report to FILE")
    p.add_argument("--json", action="store_true",
                   help="print the metrics object {base: {...}, tuned: {...}, ...} (also saved as RUN/eval.json)")
    p.set_defaults(func=cmd_eval)

    p = command("pairs", "preference pairs from a plain table: chosen = its response, rejected = a "
                         "model's (or a run's) own greedy answer to the same input")
    p.add_argument("source", metavar="MODEL_OR_RUN",
                   help="whose habits to reject: a model (alias, local HF dir, .gguf, hub id) or a run "
                        "directory (its adapter answers; DATA is read as that run read its table)")
    data_flags(p)
    p.add_argument("--out", required=True, help="JSONL file to write: prompt, chosen, rejected per line")
    p.add_argument("--n", type=int, help="only the first N examples of DATA")
    p.add_argument("--batch-size", type=int, default=16, help="prompts answered in one batch")
    _add_settings(p, GenerationSettings)
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--json", action="store_true", help="print a summary as one JSON object")
    p.set_defaults(func=cmd_pairs)

    p = command("report", "write the HTML report from what a run already holds (no model load)")
    p.add_argument("run", help="run directory written by 'habit train'")
    p.add_argument("--out", help="HTML file to write (default: RUN/report.html)")
    p.add_argument("--json", action="store_true", help="print {report: path}")
    p.set_defaults(func=cmd_report)

    p = command("serve", "OpenAI-compatible HTTP server for runs of one base, with a base-vs-tuned page")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run directories written by 'habit train' (several: one base, many adapters)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0 makes the server reachable from other machines)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ requests")
    p.add_argument("--max-tokens-cap", type=int, metavar="N",
                   help="refuse requests for more than N max_tokens; also the default max_tokens "
                        "(otherwise 256)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="most answers waiting or running; past that a request gets 503 with Retry-After")
    p.add_argument("--runtime-adapters", action="store_true",
                   help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's): clients "
                        "(with the key) may then load any run directory this machine can read")
    p.add_argument("--json", action="store_true", help='print {"url": ..., "models": [...]} once ready')
    p.set_defaults(func=cmd_serve)

    p = command("studio", "a browser page to prepare data, train, watch, compare and ship runs")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0 makes the page reachable from other machines: "
                        "give it an --api-key)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (0: any free port)")
    p.add_argument("--runs-dir", default="runs",
                   help="folder of run directories: runs started here go there, and every run in it is listed")
    p.add_argument("--api-key", help="require this key (the page asks for it once) on every /api/ request")
    p.add_argument("--max-upload-mb", type=float, default=100, metavar="MB",
                   help="largest data file the page may upload")
    p.add_argument("--no-browser", action="store_true",
                   help="do not open the page in a browser (it opens only where there is a display)")
    p.add_argument("--json", action="store_true", help='print {"url": ..., "runs_dir": ...} once ready')
    p.set_defaults(func=cmd_studio)

    from habit.bench import BenchOptions  # light: torch is imported only by its workers (subprocesses)

    p = command("bench", "train the tutorial's recipe, TRL and habit side by side: tokens/s, memory, MFU, loss")
    _add_settings(p, BenchOptions)
    p.add_argument("--out", metavar="FILE",
                   help="also write the tables into this markdown file (only their bench:* sections change)")
    p.add_argument("--json", action="store_true", help="print one JSON object {machine, peak_gflops, tokens, rows}")
    p.set_defaults(func=cmd_bench)

    p = command("merge", "merge a run's adapter into its base: a standalone Hugging Face model folder")
    p.add_argument("run", help="run directory written by 'habit train'")
    p.add_argument("--out", required=True, help="folder to write (safetensors, tokenizer, chat template)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--json", action="store_true", help='print {"path": ...}')
    p.set_defaults(func=cmd_merge)

    p = command("export", "write a run as one GGUF file for llama.cpp / Ollama (every architecture habit trains)")
    p.add_argument("run", help="run directory written by 'habit train', or a 'habit merge' folder")
    p.add_argument("--gguf", required=True, metavar="FILE", help="GGUF file to write, e.g. tuned.gguf")
    p.add_argument("--dtype", default="f16",
                   help="weight type: f16 | q8_0 | q4_0 (norms stay f32). For Q4_K_M run llama.cpp's "
                        "llama-quantize on the f16 file: gguf's Python quantizer has no K-quants")
    p.add_argument("--ollama", action="store_true",
                   help="also write an Ollama Modelfile beside the GGUF, with the run's prompt template")
    p.add_argument("--force", action="store_true", help="replace an existing GGUF file / Modelfile")
    p.add_argument("--json", action="store_true", help='print {"path": ..., "modelfile": ...}')
    p.set_defaults(func=cmd_export)

    data = command("data", "look at a data file without training")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    data.set_defaults(func=lambda a: (data.print_help(), 0)[1])

    p = command("check", "counts, shape, split, token lengths and problems", data_sub)
    data_flags(p)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="tokenizer for token counts ('' skips them)")
    p.add_argument("--max-len", type=int, default=TrainSettings().max_len,
                   help="as in train: what train's default --batch-tokens holds")
    p.add_argument("--val-frac", type=float, default=TrainSettings.val_frac, help="as in train")
    p.add_argument("--seed", type=int, default=TrainSettings.seed, help="as in train")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_data_check)

    p = command("preview", "rendered examples with the tokens that carry loss marked", data_sub)
    data_flags(p)
    p.add_argument("--model", default=DEFAULT_MODEL, help="tokenizer (and chat template) to use")
    p.add_argument("-n", type=int, default=3, help="how many examples to show")
    p.add_argument("--train-on-prompt", action="store_true", help="as in train")
    p.add_argument("--json", action="store_true", help="one JSON object per example")
    p.set_defaults(func=cmd_data_preview)
    return parser


def _version() -> str:
    from habit import __version__, allocator

    return f"habit {__version__} ({allocator.describe()})"


class _progress:
    """A rich progress bar with loss and tokens/s; a no-op shell when stderr is not a terminal."""

    def __init__(self, console):
        self.console = console

    def __enter__(self):
        if not self.console.is_terminal:
            self.progress = None
            return _NoProgress(self.console), None
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
        self.progress.start()
        return self.progress, self.progress.add_task("train", total=None, info="loading model")

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()
        return False


class _NoProgress:
    """Stands in for rich's Progress in logs and pipes: updates are dropped, prints go through."""

    def __init__(self, console):
        self.console = console

    def update(self, *args, **kwargs) -> None:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # a real command line (not a test or a caller's list): swap in a faster malloc
        from habit import allocator

        try:
            allocator.reexec(sys.argv[1:])
        except HabitError as e:
            print(f"habit: error: {e}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    _quiet_libraries()
    try:
        return args.func(args) or 0
    except Interrupted as e:
        print(f"habit: {e}", file=sys.stderr)
        return 130
    except HabitError as e:
        print(f"habit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("habit: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    # transformers' per-tensor progress bars and advisory warnings drown habit's own output.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")
    import logging

    # bitsandbytes (imported by peft whenever it is installed) warns on every start that it cannot
    # fetch an optional CPU kernel from the hub; habit's nf4 runs without it, and the line would
    # precede every command's output and its one-line errors
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


if __name__ == "__main__":
    raise SystemExit(main())
