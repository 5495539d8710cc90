"""The command line's flags, shared by the CLI and habit studio: each settings dataclass field
becomes a flag (so `--help`, the defaults and the library agree), `habit train`'s flags are built
in one place (the studio's settings form and its checks parse them too), and `habit data check`'s
report is one function.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any

from habit.settings import DEFAULT_MODEL, LoraSettings, TrainSettings

TEMPLATE_HELP = ("prompt template with {field} placeholders; the response field ends it, e.g. "
                 "'<act>: {act}\\n<prompt>: {prompt}' (default: inferred from the columns; "
                 "two-column tables use the model's chat template when it has one)")


class Help(argparse.HelpFormatter):
    """Show every option's default beside its help line."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not hidden and "default" not in text:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own usage errors also exit 2, in one line
        print(f"habit: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def add_settings(parser: argparse.ArgumentParser, cls: type) -> None:
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, type) else eval(f.type, {})  # "int | None" etc.
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=f.metadata["help"].replace("%", "%%"))
            continue
        base = next((t for t in (bool, int, float, str) if t == kind or t in getattr(kind, "__args__", ())), str)
        parser.add_argument(flag, type=base, default=f.default, metavar=f.name.upper(),
                            help=f.metadata["help"].replace("%", "%%"))


def settings_from(args: argparse.Namespace, cls: type) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def data_flags(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("data", nargs="?" if optional else None,
                   help="CSV/TSV/JSON/JSONL/Parquet file, saved dataset dir or hub dataset")
    p.add_argument("--template", help=TEMPLATE_HELP)
    p.add_argument("--response", help="the column holding the response (default: inferred)")


def train_flags(p: argparse.ArgumentParser) -> None:
    data_flags(p, optional=True)  # DATA is left out with --resume
    p.add_argument("--resume", metavar="RUN",
                   help="continue RUN from its latest checkpoint (settings and data from its run.json)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="alias, local HF model dir, .gguf file or hub id")
    p.add_argument("--out", help="run directory (default: runs/<data file name>)")
    add_settings(p, LoraSettings)
    add_settings(p, TrainSettings)
    p.add_argument("--force", action="store_true", help="replace an existing run directory")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def train_parser(parser_class: type = None) -> argparse.ArgumentParser:
    """`habit train`'s flags alone: habit studio builds its settings form from them and checks a
    form's values by parsing them, so the page and the CLI share names, defaults, help and errors."""
    p = (parser_class or Parser)(prog="habit train", formatter_class=Help)
    train_flags(p)
    return p


def data_report(args, table=None, tokenizer=None) -> dict[str, Any]:
    """What `habit data check` reports (habit studio shows the same); args: data, template,
    response, model ('' or None: no token counts), max_len, val_frac, seed. A caller that has
    already loaded the table or the model's tokenizer passes them."""
    from habit import data

    if table is None:
        table = data.load_examples(args.data, template=args.template, response=args.response)
    train, val = data.split(table, args.val_frac, args.seed)
    report: dict[str, Any] = {
        "source": table.source, "shape": table.shape, "columns": list(table.columns),
        "prompt_format": table.prompt_format, "response": table.response,
        "examples": len(table.examples), "duplicates_dropped": table.duplicates,
        "train": len(train), "val": len(val),
    }
    if args.model:
        report.update(_token_stats(table, args, tokenizer))
    return report


def _token_stats(table, args, tokenizer=None) -> dict:
    from habit import models, render

    tokenizer = tokenizer or models.load_tokenizer(models.resolve(args.model))
    template = render.choose_template(table, tokenizer)
    stop = [tokenizer.eos_token_id]
    # --max-len 0 means what training resolves it to: what one micro-batch holds
    max_len = args.max_len or TrainSettings(batch_tokens=getattr(args, "batch_tokens", TrainSettings.batch_tokens),
                                            grad_accum=getattr(args, "grad_accum", 1)).max_len
    kept, dropped = render.encode_all(table.examples, template, tokenizer, stop, max_len)
    lengths = sorted(len(e) for e in kept) or [0]
    targets = sum(sum(e.loss) for e in kept)
    return {"template": template.describe(), "tokens": sum(lengths), "loss_tokens": targets,
            "length_min": lengths[0], "length_median": lengths[len(lengths) // 2],
            "length_p99": lengths[min(len(lengths) - 1, math.ceil(0.99 * len(lengths)) - 1)],
            "length_max": lengths[-1], "max_len": max_len, "too_long": dropped}
