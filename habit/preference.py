"""Preference tuning — DPO, SimPO, ORPO, KTO — as a different loss inside habit's training loop.

Why habit's loop and not TRL's DPOTrainer/KTOTrainer: TRL pads every chosen/rejected pair to a
common length in its own collator and brings its own data order, checkpoints and device
handling, so packing, the checked fast paths, resuming to the same batches, DDP's normalisation by
a global count and the NaN stop would all be TRL's or missing. Here a preference step differs
from an SFT step only in what a pass's loss is: a function (habit/losses.py) of each answer's
summed log-probability, read from the same packed rows with the same per-example attention.

- Rendering: each answer is an ordinary Example (prompt + that answer) put through the one render
  function, so loss masks and EOS are SFT's. The log-probability of an answer is the sum over its
  loss-carrying tokens (response + EOS).
- Packing: a pair is a unit that never splits — its two answers sit in one row, so they land in
  the same pass and the same optimizer step on the same process.
- The reference: the policy before its first update — the `--from` run's adapter, frozen (what
  TRL does for a trained PEFT model; disabling the adapter is the right reference only for a fresh
  one), or the base with the adapter off. Its log-probs are computed once per answer before
  training and kept in RUN/reference.pt, so a resumed run uses the very same numbers.
- KTO's reference point z0 is the step's mean reward (policy − reference), measured without
  gradients before the step's passes and summed over processes: exact on any process count, at
  the cost of one forward a step (TRL's KL pass over mismatched answers costs as much).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from habit import fastpath, losses, render
from habit.data import Preference, PreferenceTable
from habit.errors import HabitError
from habit.render import Template

BETA = {"dpo": 0.1, "simpo": 2.0, "orpo": 0.1, "kto": 0.1}  # orpo: the weight λ of its odds term
REFERENCE_FILE = "reference.pt"


@dataclass(frozen=True)
class Side:
    """One rendered answer of a preference record: the fields of render.Encoded (packing and
    training.tensors read only those), plus which record it belongs to and its role."""

    ids: tuple[int, ...]
    loss: tuple[bool, ...]
    where: str
    unit: int  # index of its record among the run's encoded records: its row in the reference cache
    role: str  # "chosen" | "rejected" (pairs) | "desirable" | "undesirable" (KTO)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def column(self) -> int:  # where its reference log-prob sits: a pair's rejected answer in 1
        return 1 if self.role == "rejected" else 0


@dataclass(frozen=True)
class Unit:
    """What must land in one pass: a pair's two answers, or one KTO answer."""

    sides: tuple[Side, ...]

    def __len__(self) -> int:
        return sum(len(s) for s in self.sides)


# ---------------------------------------------------------------- rendering


def pair_template(table: PreferenceTable, tokenizer, like: Template | None = None) -> Template:
    """How preference records render, decided once. Chat messages use the model's chat template.
    A text prompt is the user's message when the model has a chat template, else the literal text
    the model continues; `like` (the --from run's template) decides between the two, so pairs
    written by `habit pairs` from that run's table render exactly as its SFT examples did."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    kind = like.kind if like is not None else ("chat" if has_chat else "text")
    if kind == "chat" and not has_chat:
        raise HabitError(f"{table.source}: chat preference data needs a model with a chat template")
    if kind == "text":
        chat = next((r for r in table.records if r.chosen.messages), None)
        if chat is not None:
            raise HabitError(f"{chat.where}: chat messages, but this run renders plain text prompts")
        return Template("text", "{prompt}", "completion")
    if not any(r.chosen.fields for r in table.records):  # all chat: as SFT renders chat data
        return Template("chat", None, None)
    return Template("chat", "{prompt}", "completion")


def record_prompt(record: Preference, template: Template, tokenizer) -> str:
    return render.example_prompt(record.chosen, template, tokenizer)


def encode_units(records: Sequence[Preference], template: Template, tokenizer, stop: Sequence[int],
                 max_len: int, train_on_prompt: bool = False, start: int = 0):
    """(units, dropped): each record's answers rendered; a record with an answer longer than
    max_len is dropped whole (as (where, length)). Units are numbered from `start`."""
    units, dropped = [], []
    for record in records:
        if record.rejected is not None:
            answers = [(record.chosen, "chosen"), (record.rejected, "rejected")]
        else:
            answers = [(record.chosen, "desirable" if record.label else "undesirable")]
        encoded = [(render.encode(ex, template, tokenizer, stop, train_on_prompt), role) for ex, role in answers]
        longest = max(len(e) for e, _ in encoded)
        if longest > max_len:
            dropped.append((record.where, longest))
            continue
        n = start + len(units)
        units.append(Unit(tuple(Side(e.ids, e.loss, record.where, n, role) for e, role in encoded)))
    return units, dropped


def split_records(table: PreferenceTable, val_frac: float, seed: int,
                  sft_split: tuple[set, set] | None = None, prompt_of=None):
    """(train, val) records. By the hash of each prompt, as data.split does for SFT tables; with
    `sft_split` (the rendered prompts of the --from run's training and validation examples), a
    record whose prompt the SFT run held out stays held out and one it trained on stays in
    training, so the held-out pairs are prompts neither run learned from."""
    from habit.data import Table, split

    records = table.records
    if sft_split is not None:
        trained, held = sft_split
        prompts = [prompt_of(r) for r in records]
        fresh = [r for r, p in zip(records, prompts) if p not in trained and p not in held]
        in_val = {id(r) for r, p in zip(records, prompts) if p in held}
    else:
        fresh, in_val = list(records), set()
    if fresh:
        shadow = Table(table.source, table.shape, (), None, None, False,
                       tuple(r.chosen for r in fresh), 0, table.sha256)
        _, val = split(shadow, val_frac, seed)
        picked = {id(e) for e in val}
        in_val |= {id(r) for r in fresh if id(r.chosen) in picked}
    return [r for r in records if id(r) not in in_val], [r for r in records if id(r) in in_val]


# ---------------------------------------------------------------- planning


def row_width(units: Sequence[Unit]) -> int:
    """Rows hold whole units: as wide as the longest one needs, rounded like SFT rows (each
    answer is at most --max-len, so a pair's row can be up to twice that)."""
    from habit.training import ROW_ALIGN

    longest = max(len(u) for u in units)
    return -(-longest // ROW_ALIGN) * ROW_ALIGN


def plan_units(units: Sequence[Unit], width: int, micro_tokens: int, seed: int, epoch: int,
               shuffle: bool = True):
    """training.plan_epoch over units: the same shuffle, first-fit packing and grouping, each
    unit's answers kept next to each other in one row."""
    from habit.training import Batch, pack

    order = list(units)
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    rows = [tuple(s for unit in row for s in unit.sides) for row in pack(order, width)]
    per = max(1, micro_tokens // width)
    return [Batch(tuple(rows[i : i + per]), width) for i in range(0, len(rows), per)]


def units_in(batch) -> int:
    """Records in a batch: what a preference step averages over (SFT averages over tokens)."""
    return len({s.unit for row in batch.rows for s in row})


# ---------------------------------------------------------------- log-probabilities


def sequence_logprobs(model, batch, pad_id: int, device, fast=None):
    """(sides in batch order, summed log-prob of each side's targets, their counts) for a batch of
    packed sides; the sums carry the graph. Same tensors, attention and fast paths as
    training.batch_loss: only the head's output is per token instead of summed."""
    import torch

    from habit import training

    packed = bool(fast and fast.attention)
    prefix = fast.prefix if packed else 0
    if packed:
        batch = training.one_row(batch, prefix)
    ids, pos, keep, targets, lengths = training.tensors(batch, pad_id, prefix)
    extra = {"habit_packing": fastpath.Packing(lengths, batch.width, device, prefix)} if packed else {}
    ids, pos, keep, targets = ids.to(device), pos.to(device), keep.to(device), targets.to(device)
    sides = [s for row in batch.rows for s in row]
    # training.tensors puts a side's targets at loss[prefix + 1:] (the prefix carries no loss)
    counts = torch.tensor([sum(s.loss[prefix + 1 :]) for s in sides], device=device)
    with fast.step(targets, per_token=True) if fast is not None else contextlib.nullcontext():
        out = model(input_ids=ids, position_ids=pos, logits_to_keep=keep, use_cache=False, **extra)
    if fast is not None and fast.head is not None:
        per_token = out.logits
    else:
        logits = out.logits.reshape(-1, out.logits.shape[-1]).float()
        per_token = logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]
    which = torch.repeat_interleave(torch.arange(len(sides), device=device), counts)
    sums = torch.zeros(len(sides), dtype=torch.float32, device=device).index_add(0, which, per_token.float())
    return sides, sums, counts


def logprob_loss(model, batch, pad_id: int, device, fast=None):
    """The summed negative log-probs and their count: what training.check_fast compares between
    the plain and the fast paths for a preference run (it goes through this module's head)."""
    _, sums, counts = sequence_logprobs(model, batch, pad_id, device, fast)
    return -sums.sum(), int(counts.sum())


# ---------------------------------------------------------------- the loss of a pass


@dataclass(frozen=True)
class Loss:
    """A preference run's loss, decided once: the method, its β and the reference cache
    ([records, 2] fp64: chosen or KTO answer in column 0, rejected in 1; None for SimPO/ORPO)."""

    method: str
    beta: float
    reference: object = None

    def pass_loss(self, model, batch, pad_id: int, device, fast=None, z0=None):
        """(summed loss over the batch's records, their number, summed stats) of one pass."""
        import torch

        sides, logps, counts = sequence_logprobs(model, batch, pad_id, device, fast)
        units = list(dict.fromkeys(s.unit for s in sides))
        ref = None
        if self.reference is not None:
            ref = self.reference.to(device=device, dtype=logps.dtype)
        if self.method == "kto":
            at = torch.tensor([s.unit for s in sides], device=device)
            good = torch.tensor([s.role == "desirable" for s in sides], device=device)
            out = losses.kto(logps, ref[at, 0], good, torch.as_tensor(z0 or 0.0, device=device),
                             beta=self.beta)
            stats = {"rewards_desirable": float(out.chosen_reward.sum()),
                     "rewards_undesirable": float(out.rejected_reward.sum()),
                     "n_desirable": int(good.sum()), "n_undesirable": int((~good).sum())}
            return out.loss * len(sides), len(sides), stats
        pick = {(s.unit, s.role): i for i, s in enumerate(sides)}
        c = torch.tensor([pick[(u, "chosen")] for u in units], device=device)
        r = torch.tensor([pick[(u, "rejected")] for u in units], device=device)
        at = torch.tensor(units, device=device)
        if self.method == "dpo":
            out = losses.dpo(logps[c], logps[r], ref[at, 0], ref[at, 1], beta=self.beta)
        elif self.method == "simpo":
            out = losses.simpo(logps[c], logps[r], counts[c], counts[r], beta=self.beta)
        else:
            out = losses.orpo(logps[c], logps[r], counts[c], counts[r], lam=self.beta)
        margin = out.chosen_reward - out.rejected_reward
        stats = {"rewards_chosen": float(out.chosen_reward.sum()),
                 "rewards_rejected": float(out.rejected_reward.sum()),
                 "reward_accuracy": float((margin > 0).sum()), "margin": float(margin.sum()),
                 "logps_chosen": float(logps[c].detach().sum()),
                 "logps_rejected": float(logps[r].detach().sum())}
        return out.loss * len(units), len(units), stats

    def reference_point(self, model, batches, pad_id: int, device, fast=None) -> tuple[float, int]:
        """KTO: (summed reward policy − reference, answers) over batches, without gradients."""
        import torch

        total, n = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                sides, logps, _ = sequence_logprobs(model, batch, pad_id, device, fast)
                at = torch.tensor([s.unit for s in sides], device=device)
                total += float((logps.double() - self.reference.to(device)[at, 0]).sum())
                n += len(sides)
        return total, n


def logged(stats: dict, units: int) -> dict:
    """Per-step means of summed stats, named as TRL logs them."""
    out = {}
    for key, value in stats.items():
        if key.startswith("n_"):
            continue
        if key in ("rewards_desirable", "rewards_undesirable"):
            n = stats["n_" + key.split("_")[1]]
            out[key] = round(value / n, 5) if n else None
        else:
            out[key] = round(value / max(1, units), 5)
    return out


# ---------------------------------------------------------------- the reference cache


def reference_logprobs(model, units: Sequence[Unit], width: int, micro_tokens: int, pad_id: int,
                       device, fast=None, adapter_off: bool = False, accelerator=None):
    """[records, 2] fp64 summed log-probs of every answer under the reference: the model as it is
    now (a --from adapter), or with its adapter off. `units` are numbered 0..len-1 (train and
    validation together). Each process computes every world-th batch, and one sum joins them."""
    import torch

    from habit.adapters import adapter_off as off

    world = accelerator.num_processes if accelerator else 1
    rank = accelerator.process_index if accelerator else 0
    ref = torch.zeros(len(units), 2, dtype=torch.float64)
    batches = plan_units(units, width, micro_tokens, 0, 0, shuffle=False)[rank::world]
    was_training = model.training
    model.eval()
    with torch.no_grad(), off(model, adapter_off):
        for batch in batches:
            sides, logps, _ = sequence_logprobs(model, batch, pad_id, device, fast)
            for side, value in zip(sides, logps.double().cpu()):
                ref[side.unit, side.column] = value
    model.train(was_training)
    if world > 1:
        ref = accelerator.reduce(ref.to(accelerator.device), "sum").cpu()
    return ref


def digest(units: Sequence[Unit]) -> str:
    """What the cache was computed for: every answer's ids and loss mask, in order."""
    h = hashlib.sha256()
    for unit in units:
        for side in unit.sides:
            h.update(repr((side.role, side.ids, side.loss)).encode())
    return h.hexdigest()


def save_reference(run: Path, ref, units: Sequence[Unit]) -> None:
    import torch

    tmp = run / f".{REFERENCE_FILE}.tmp"
    torch.save({"digest": digest(units), "logps": ref}, tmp)
    os.replace(tmp, run / REFERENCE_FILE)


def load_reference(run: Path, units: Sequence[Unit]):
    """The cache a run computed when it started; refuses one made for other answers."""
    import torch

    path = run / REFERENCE_FILE
    if not path.is_file():
        raise HabitError(f"{run}: no {REFERENCE_FILE}; the run's reference log-probs are gone")
    saved = torch.load(path, weights_only=True)
    if saved["digest"] != digest(units):
        raise HabitError(f"{path}: computed for other answers than this run's data renders to")
    return saved["logps"]


# ---------------------------------------------------------------- the objective training runs


def objective(table, model: str, lora, settings):
    """(base source, LoRA settings, objective) for `habit train DATA --method M [--from RUN]`."""
    from habit import models, rundir
    from habit.data import Table
    from habit.settings import DEFAULT_MODEL, LoraSettings, from_dict

    method = settings.method
    if isinstance(table, Table):
        raise HabitError(f"{table.source}: --method {method} trains on preference data: columns "
                         "prompt, chosen, rejected (kto also: prompt, completion, label)")
    if table.shape == "unpaired" and method != "kto":
        raise HabitError(f"{table.source}: rows with a label and no pair train with --method kto, "
                         f"not {method}")
    like, from_info = None, None
    if settings.from_run:
        from_info = rundir.read_run(settings.from_run)
        if not (Path(settings.from_run) / "adapter_model.safetensors").is_file():
            raise HabitError(f"{settings.from_run}: no adapter in this run (training unfinished?)")
        given = from_info["base"]["source"]
        if model not in (DEFAULT_MODEL, given):
            raise HabitError(f"--model {model}: --from {settings.from_run} continues that run on its "
                             f"base {given}; leave --model out")
        model = given
        lora = from_dict(LoraSettings, from_info["settings"]["lora"])
        like = Template.from_dict(from_info["template"])
    source = models.resolve(model)
    if from_info and source.kind != "hub" and from_info["base"].get("sha256") not in (
            None, models.content_hash(source)):
        raise HabitError(f"{settings.from_run}: its base '{model}' changed since that run trained")
    beta = settings.beta if settings.beta is not None else BETA[method]
    return source, lora, PreferenceObjective(method, beta, settings.from_run, like, from_info)


_STATS = {"pairs": ("rewards_chosen", "rewards_rejected", "reward_accuracy", "margin",
                    "logps_chosen", "logps_rejected"),
          "kto": ("rewards_desirable", "rewards_undesirable", "n_desirable", "n_undesirable")}


class PreferenceObjective:
    """training.Objective's methods for a preference loss (see that class); built once per run by
    `objective`; setup fills in the run's encoded records, start the reference cache, and each
    step its KTO reference point and the stats `logged` reports."""

    def __init__(self, method: str, beta: float, from_run: str | None, like: Template | None,
                 from_info: dict | None):
        self.name, self.method, self.beta = method, method, beta
        self.from_run, self.like, self.from_info = from_run, like, from_info
        self.units: list[Unit] = []  # train then validation, numbered in that order
        self.fn = Loss(method, beta)
        self.z0 = 0.0
        self.idle = False
        self.stats = self._zero()
        self.micro_tokens = 1024

    # --- data
    def setup(self, table: PreferenceTable, run: Path, source, lora, settings):
        from habit import models, training

        self.micro_tokens = settings.micro_tokens
        accelerator, dtype, need, base, tokenizer = training.runtime(run, source, lora, settings)
        template = pair_template(table, tokenizer, self.like)
        stop = models.stop_ids(tokenizer, base)
        train_r, val_r = run_split(table, self.method, settings.val_frac, settings.seed,
                                   self.from_info, template, tokenizer)
        if not train_r:
            raise HabitError(f"{table.source}: no training records left after the validation split")
        train_u, dropped = encode_units(train_r, template, tokenizer, stop, settings.max_len,
                                        settings.train_on_prompt)
        val_u, val_dropped = encode_units(val_r, template, tokenizer, stop, settings.max_len,
                                          settings.train_on_prompt, start=len(train_u))
        if not train_u:
            raise HabitError(f"{table.source}: every record has an answer longer than --max-len "
                             f"{settings.max_len}")
        self.units = train_u + val_u
        flat = lambda units: [s for u in units for s in u.sides]
        liked = lambda rs: [r.chosen for r in rs if r.rejected is not None or r.label]
        return training.Setup(accelerator, dtype, need, base, tokenizer, template, stop,
                              liked(train_r), liked(val_r), flat(train_u), flat(val_u),
                              dropped, val_dropped, settings.shard)

    def width(self, sides, max_len: int) -> int:
        return row_width(group(sides))

    def planner(self, sides, width: int, micro_tokens: int, seed: int, epoch: int, shuffle: bool = True):
        return plan_units(group(sides), width, micro_tokens, seed, epoch, shuffle)

    # --- model
    def adapter(self, base, lora):
        from habit import adapters, models

        if self.from_run is None:
            return adapters.attach(base, lora)
        from peft import PeftModel

        try:  # bf16 LoRA weights as adapters.attach makes them; training keeps fp32 masters
            return PeftModel.from_pretrained(base, self.from_run, is_trainable=True,
                                             autocast_adapter_dtype=False)
        except Exception as e:
            raise HabitError(f"{self.from_run}: cannot load its adapter ({models._one_line(e)})") from None

    def check_loss(self, model, batch, pad_id: int, device, fast):
        return logprob_loss(model, batch, pad_id, device, fast)

    def start(self, s, t, run: Path, resumed: bool) -> None:
        """The reference cache: computed now, before any update, or read back when resuming."""
        if not losses.NEEDS_REFERENCE[self.method]:
            return
        if resumed:
            ref = load_reference(run, self.units)
        else:
            ref = reference_logprobs(s.accelerator.unwrap_model(t.model), self.units,
                                     row_width(self.units), self.micro_tokens, s.pad_id, s.device,
                                     t.fast, adapter_off=self.from_run is None, accelerator=s.accelerator)
            if s.main:
                save_reference(run, ref, self.units)
        self.fn = Loss(self.method, self.beta, ref)

    # --- a step
    def before_step(self, s, t, work: list) -> None:
        self.idle = not work
        if self.method != "kto":
            return
        model = s.accelerator.unwrap_model(t.model)
        was_training = model.training
        model.eval()
        total, n = self.fn.reference_point(model, work, s.pad_id, s.device, t.fast)
        model.train(was_training)
        if s.world > 1:
            import torch

            sums = s.accelerator.reduce(torch.tensor([total, float(n)], dtype=torch.float64,
                                                     device=s.device), "sum")
            total, n = float(sums[0]), int(sums[1])
        self.z0 = max(0.0, total / max(1, n))

    def count(self, batch) -> int:
        return units_in(batch)

    def loss(self, model, batch, pad_id: int, device, fast):
        loss, n, stats = self.fn.pass_loss(model, batch, pad_id, device, fast, self.z0)
        if not self.idle:
            self.stats["n"] += n
            for key, value in stats.items():
                self.stats[key] += value
        return loss, n

    def _zero(self) -> dict:
        return dict.fromkeys(("n",) + _STATS["kto" if self.method == "kto" else "pairs"], 0.0)

    def logged(self, accelerator, prefix: str = "") -> dict:
        """Step (or validation) means of rewards, reward accuracy, margins and log-probs."""
        keys = list(self.stats)
        values = [self.stats[k] for k in keys]
        self.stats, self.idle = self._zero(), False
        if accelerator.num_processes > 1:
            import torch

            values = accelerator.reduce(torch.tensor(values, dtype=torch.float64,
                                                     device=accelerator.device), "sum").tolist()
        sums = dict(zip(keys, values))
        out = logged({k: v for k, v in sums.items() if k != "n"}, int(sums["n"]))
        if self.method == "kto":
            out["kl"] = round(self.z0, 5)
        return {prefix + k: v for k, v in out.items()}

    def describe(self, table: PreferenceTable, s) -> dict:
        d = (self.from_info or {}).get("data", {})
        template = self.like or s.template
        train_units = len({x.unit for x in s.train_enc})
        return {
            "template": template.to_dict(), "template_text": template.describe(),
            "data": {"source": table.source, "path": os.path.abspath(table.source)
                     if os.path.exists(table.source) else table.source,
                     "shape": table.shape, "sha256": table.sha256,
                     # how a later `habit eval --data TABLE` reads the --from run's kind of table
                     "template_arg": d.get("template_arg"), "response_arg": d.get("response_arg"),
                     "records": len(table.records), "duplicates_dropped": table.duplicates,
                     "train": train_units, "val": len(self.units) - train_units,
                     "too_long_dropped": [list(x) for x in s.dropped + s.val_dropped]},
            "preference": {
                "method": self.method, "beta": self.beta,
                "from": os.path.abspath(self.from_run) if self.from_run else None,
                "reference": (None if not losses.NEEDS_REFERENCE[self.method] else
                              "the --from run's adapter, frozen" if self.from_run else
                              "the base (adapter off)"),
                "pair_template": s.template.to_dict()},
        }


def run_split(table: PreferenceTable, method: str, val_frac: float, seed: int,
              from_info: dict | None, template: Template, tokenizer):
    """A preference run's (train, validation) records, as training made them and eval remakes
    them: KTO on pairs learns from each answer alone, and a --from run's split is kept."""
    records = table.records
    if method == "kto" and table.shape == "pairs":
        records = tuple(_kto_record(r, side) for r in records for side in (True, False))
    shown = PreferenceTable(table.source, table.shape, table.text, records, 0, table.sha256)
    sft = sft_split(from_info, tokenizer)
    return split_records(shown, val_frac, seed, sft, lambda r: record_prompt(r, template, tokenizer))


def sft_split(from_info: dict | None, tokenizer):
    """The --from run's (trained, held-out) prompts as rendered text; None without one, or when
    its table is gone or is itself preference data (the split then goes by hash alone)."""
    if from_info is None:
        return None
    from habit.data import load_examples, split

    d, s = from_info["data"], from_info["settings"]["train"]
    try:
        table = load_examples(d.get("path") or d["source"], template=d.get("template_arg"),
                              response=d.get("response_arg"))
    except HabitError:
        return None
    like = Template.from_dict(from_info["template"])
    trained, held = split(table, s["val_frac"], s["seed"])
    show = lambda exs: {render.example_prompt(e, like, tokenizer) for e in exs}
    return show(trained), show(held)


def _kto_record(record: Preference, chosen: bool) -> Preference:
    """One answer of a pair as a KTO record: the chosen one desirable, the rejected one not."""
    return Preference(record.chosen if chosen else record.rejected, None, chosen, record.where)


def group(sides: Sequence[Side]) -> list[Unit]:
    """Sides back into their units (each unit's sides are adjacent, as encode_units made them)."""
    units: list[list[Side]] = []
    for side in sides:
        if units and units[-1][0].unit == side.unit:
            units[-1].append(side)
        else:
            units.append([side])
    return [Unit(tuple(u)) for u in units]
