"""Training: a plain loop over packed batches, with accelerate carrying devices and DDP.

Why a hand loop and not Trainer: habit packs several examples into one row with position ids
that restart at 0 per example (transformers then builds a block-diagonal causal mask, so examples
do not see each other) and asks the model for logits only where a token carries loss — both are a
few lines here and awkward through Trainer's collators. accelerate makes the same loop run
unchanged under `accelerate launch` or `torchrun` (DDP), with rank 0 writing the run directory.

Data order is a pure function of (seed, epoch), so a resumed or multi-process run sees the same
batches as an uninterrupted one.

Reading order: `_fit` is the recipe, setup → plan → prepare → (train_step, validate, checkpoint)
per step → finish; each part is a function below it that reads alone. What a step minimises is an
`Objective`: SFT's token loss here; habit/preference.py brings the preference losses (DPO, SimPO,
ORPO, KTO), which differ in how the data renders and packs, which adapter starts, and a pass's loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from habit import adapters, allocator, fastpath, memory, metrics, models, rundir, sharding
from habit.data import Example, Table, split
from habit.errors import HabitError, Interrupted
from habit.render import Encoded, Template, choose_template, encode_all
from habit.settings import DEFAULT_MODEL, VAL_POINTS, LoraSettings, TrainSettings, as_dict

ROW_ALIGN = 64  # row lengths round up to this: fewer distinct shapes, friendlier matmul sizes


@dataclass(frozen=True)
class Batch:
    """Rows of packed examples: ids, position ids (restarting per example) and the loss mask."""

    rows: tuple[tuple[Encoded, ...], ...]
    width: int

    @property
    def tokens(self) -> int:
        return sum(len(e) for row in self.rows for e in row)

    @property
    def targets(self) -> int:
        return sum(sum(e.loss[1:]) for row in self.rows for e in row)

    def computed(self, prefix: int = 0) -> int:
        """Tokens the model runs on when a shared prefix is held once, not once an example."""
        return self.tokens - prefix * (sum(len(row) for row in self.rows) - 1)


def pack(examples: Sequence[Encoded], width: int) -> list[list[Encoded]]:
    """First-fit: put each example in the first row with room, else open a new row."""
    rows: list[list[Encoded]] = []
    room: list[int] = []
    for ex in examples:
        for i, free in enumerate(room):
            if len(ex) <= free:
                rows[i].append(ex)
                room[i] -= len(ex)
                break
        else:
            rows.append([ex])
            room.append(width - len(ex))
    return rows


def row_width(encoded: Sequence[Encoded], max_len: int) -> int:
    longest = max(len(e) for e in encoded)
    return min(max_len, -(-longest // ROW_ALIGN) * ROW_ALIGN) if longest < max_len else max_len


def plan_epoch(encoded: Sequence[Encoded], width: int, micro_tokens: int, seed: int, epoch: int,
               shuffle: bool = True) -> list[Batch]:
    """The micro-batches of one epoch, in order. Same inputs → same batches, on every rank."""
    order = list(encoded)
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    rows = pack(order, width)
    per_batch = max(1, micro_tokens // width)
    return [Batch(tuple(tuple(r) for r in rows[i : i + per_batch]), width)
            for i in range(0, len(rows), per_batch)]


def passes(batch: Batch, most_tokens: int) -> list[Batch]:
    """A micro-batch as forward/backward passes of at most `most_tokens` (whole rows, at least one
    a pass): activation memory follows the pass, the summed gradient does not change."""
    per = max(1, most_tokens // batch.width)
    return [Batch(batch.rows[i : i + per], batch.width) for i in range(0, len(batch.rows), per)]


def tensors(batch: Batch, pad_id: int, prefix: int = 0):
    """(input_ids, position_ids, keep, targets, sequence lengths per row) for a batch; keep[b, t]
    marks positions whose next token is a target, which is exactly where logits are needed.

    With `prefix` (fastpath.shared_prefix: the leading tokens every example shares), the prefix
    is written once, at the start of row 0, and each example without it, its positions going on
    from `prefix`; only the packed attention fast path knows to join them."""
    import torch

    n, width = len(batch.rows), batch.width
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    loss = torch.zeros((n, width), dtype=torch.bool)
    lengths = []
    for b, row in enumerate(batch.rows):
        t = 0
        lengths.append([])
        if prefix and b == 0:
            ids[0, :prefix] = torch.tensor(row[0].ids[:prefix])
            pos[0, :prefix] = torch.arange(prefix)
            lengths[0].append(prefix)
            t = prefix
        for ex in row:
            k = len(ex) - prefix
            ids[b, t : t + k] = torch.tensor(ex.ids[prefix:])
            pos[b, t : t + k] = torch.arange(prefix, len(ex))
            # the first token of a sequence is never a target: nothing before it in this row (and
            # after a prefix, the first token is still part of the prompt: shared_prefix ensures it)
            loss[b, t + 1 : t + k] = torch.tensor(ex.loss[prefix + 1 :], dtype=torch.bool)
            lengths[b].append(k)
            t += k
        # padding at the row end: positions restart, so it is a separate (masked) sequence
        pos[b, t:] = torch.arange(width - t)
    keep = torch.zeros_like(loss)
    keep[:, :-1] = loss[:, 1:]
    return ids, pos, keep, ids[:, 1:][loss[:, 1:]], lengths


def one_row(batch: Batch, prefix: int = 0) -> Batch:
    """The batch's examples end to end in one row, as long as they need (to a multiple of
    ROW_ALIGN_FLAT). Only for the packed attention fast path, which attends within each example
    wherever it sits: rows exist for the plain path, whose attention costs the row length squared,
    and the room first-fit leaves at their ends (~10% of a row) is computed like any token."""
    examples = tuple(ex for row in batch.rows for ex in row)
    return Batch((examples,), -(-batch.computed(prefix) // ROW_ALIGN_FLAT) * ROW_ALIGN_FLAT)


ROW_ALIGN_FLAT = 16


def batch_loss(model, batch: Batch, pad_id: int, device, fast: fastpath.FastPaths | None = None):
    """Summed cross-entropy over the batch's targets, and the number of targets."""
    import torch.nn.functional as F

    packed = bool(fast and fast.attention)
    prefix = fast.prefix if packed else 0
    if packed:
        batch = one_row(batch, prefix)
    ids, pos, keep, targets, lengths = tensors(batch, pad_id, prefix)
    extra = {"habit_packing": fastpath.Packing(lengths, batch.width, device, prefix)} if packed else {}
    ids, pos, keep, targets = ids.to(device), pos.to(device), keep.to(device), targets.to(device)
    # attention_mask=None + restarting position_ids → block-diagonal causal attention per example;
    # use_cache=False is required for that (with a cache, attention leaks across examples).
    with fast.step(targets) if fast else contextlib.nullcontext():
        out = model(input_ids=ids, position_ids=pos, logits_to_keep=keep, use_cache=False, **extra)
    if fast and fast.head is not None:  # the head computed the summed loss itself
        return out.logits, targets.numel()
    logits = out.logits.reshape(-1, out.logits.shape[-1])
    return F.cross_entropy(logits.float(), targets, reduction="sum"), targets.numel()


def check_fast(model, batch: Batch, pad_id: int, device, fast: fastpath.FastPaths,
               loss_fn: Callable | None = None) -> tuple[bool, float]:
    """Loss and LoRA gradients of up to two packed rows through the fast paths and the plain path:
    (whether they agree, the larger relative difference). Same RNG for both passes.

    A fresh adapter has B = 0, where a wrong merge or a wrong gradient of A would go unseen (the
    merged weight equals W and A's gradient is zero on both paths); so B is set to small random
    values for the check, then restored. `loss_fn`: batch_loss's signature and result (a
    preference run checks its per-sequence log-probs)."""
    return _compare(model, batch, pad_id, device, loss_fn,
                    [_paths(None), _paths(fast)])


def check_compiled(model, batch: Batch, pad_id: int, device, fast: fastpath.FastPaths,
                   compiled: fastpath.Compiled, loss_fn: Callable | None = None) -> tuple[bool, float]:
    """As check_fast, the same fast paths eager and through the compiled layers (the first call
    compiles them)."""
    return _compare(model, batch, pad_id, device, loss_fn,
                    [_paths(fast, fast.fixed_weights()),
                     _paths(fast, compiled.active(), fast.fixed_weights())])


@contextlib.contextmanager
def _paths(fast: fastpath.FastPaths | None, *contexts):
    """Yields `fast` (the paths a loss function takes) with these contexts entered."""
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield fast


def _compare(model, batch: Batch, pad_id: int, device, loss_fn: Callable | None,
             ways: Sequence) -> tuple[bool, float]:
    """Loss and LoRA gradients of up to two rows computed two ways (each a context manager,
    entered once, yielding the fast paths to pass): whether they agree, the larger relative
    difference."""
    import torch

    loss_fn = loss_fn or batch_loss
    row = Batch(batch.rows[:2], batch.width)
    params = [p for p in model.parameters() if p.requires_grad]
    found = []
    with _lora_b_perturbed(model):
        for way in ways:
            with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
                torch.manual_seed(0)
                with way as paths:
                    loss, _ = loss_fn(model, row, pad_id, device, paths)
                    loss.backward()
            grads = torch.cat([p.grad.float().flatten() for p in params if p.grad is not None])
            found.append((float(loss.detach()), grads))
            model.zero_grad(set_to_none=True)
    (plain, g_plain), (quick, g_quick) = found
    loss_diff = abs(quick - plain) / max(abs(plain), 1e-6)
    grad_diff = float((g_quick - g_plain).norm() / g_plain.norm().clamp_min(1e-12))
    exact = params[0].dtype == torch.float32
    loss_tol, grad_tol = (1e-3, 1e-3) if exact else FAST_TOLERANCE_BF16
    return loss_diff < loss_tol and grad_diff < grad_tol, max(loss_diff, grad_diff)


@contextlib.contextmanager
def _lora_b_perturbed(model, std: float = 0.02):
    """LoRA's B weights set to seeded N(0, std²) while inside, put back after (RNG state too)."""
    import torch

    saved = {}
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                saved[name] = p.detach().clone()
                p.normal_(0.0, std)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in saved:
                    p.copy_(saved[name])


# In bf16 the plain path itself is ~2e-4 (loss) and ~6% (gradient norm) away from fp32, and the fast
# paths land as close to fp32 as it does (measured on SmolLM2), so the check allows bf16 noise; a
# head that post-processes its logits (softcapping, scaling) moves the loss by far more than 1%.
FAST_TOLERANCE_BF16 = (1e-2, 0.25)


def eval_sums(model, batches: Sequence[Batch | None], pad_id: int, device,
              fast: fastpath.FastPaths | None = None, filler: Batch | None = None,
              loss_fn: Callable | None = None) -> tuple[float, int]:
    """(summed response-token loss, number of targets) over the batches, without gradients. A
    None batch runs `filler` uncounted (a sharded model needs the same forwards on every process).
    `loss_fn`: another objective's pass loss, batch_loss's signature."""
    import torch

    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            loss, n = (loss_fn or batch_loss)(model, batch or filler, pad_id, device, fast)
            if batch is not None:
                total += float(loss)
                count += n
    model.train(was_training)
    return total, count


def eval_loss(model, batches: Sequence[Batch], pad_id: int, device) -> float | None:
    """Mean response-token loss over the batches (None when there is nothing to evaluate)."""
    total, count = eval_sums(model, batches, pad_id, device)
    return total / count if count else None


def lr_at(step: int, total: int, warmup: float) -> float:
    """Multiplier of the peak lr: linear warm-up, then cosine down to 10%."""
    warm = max(1, round(total * warmup)) if warmup > 0 else 0
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    run_dir: str
    train_loss: float | None
    val_loss: float | None
    tokens_per_s: float
    steps: int
    train_examples: int
    val_examples: int
    dropped: list = field(default_factory=list)
    seconds: float = 0.0
    fast_paths: list = field(default_factory=list)  # which ran; [] when off or when the check failed
    fast_check: float | None = None  # their largest relative difference from the plain path
    kept_step: int | None = None  # the step whose adapter the run saved (--keep best: lowest val loss)
    kept_val_loss: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def versions() -> dict:
    import accelerate
    import peft
    import torch
    import transformers

    import habit

    return {"habit": habit.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__, "python": sys.version.split()[0]}


def train(table: Table, out: str | os.PathLike, model: str = DEFAULT_MODEL,
          lora: LoraSettings = LoraSettings(), settings: TrainSettings = TrainSettings(),
          force: bool = False, on_log: Callable[[dict], None] | None = None) -> TrainResult:
    """Train a LoRA adapter on `table` and write a run directory to `out`. A preference table
    (data.load_preferences) with settings.method dpo, simpo, orpo or kto trains that loss
    (habit/preference.py); settings.from_run continues that run's adapter on its base."""
    rundir.check_new(out, force)
    source, lora, objective = _objective(table, model, lora, settings)
    return _fit(table, Path(out), source, lora, settings, on_log, force=force, objective=objective)


def _objective(table, model: str, lora: LoraSettings, settings: TrainSettings):
    """(base source, LoRA settings, objective) for a run: SFT on a Table, a preference loss on a
    PreferenceTable (whose --from run decides the base and the LoRA shape)."""
    if settings.method == "sft":
        if not isinstance(table, Table):
            raise HabitError(f"{table.source}: preference data; pick a loss with --method dpo, "
                             "simpo, orpo or kto")
        return models.resolve(model), lora, Objective()
    from habit import preference

    return preference.objective(table, model, lora, settings)


def resume(run: str | os.PathLike, on_log: Callable[[dict], None] | None = None) -> TrainResult:
    """Continue a run from its latest complete checkpoint, with the settings in its run.json.

    The data order is a function of (seed, epoch), and the checkpoint holds the fp32 master
    weights, optimizer, scheduler and RNG state, so the result matches an uninterrupted run."""
    from habit.data import load_examples
    from habit.settings import from_dict

    from habit.data import load_preferences

    run = Path(run)
    info = rundir.read_run(run)
    checkpoint = latest_checkpoint(run)
    if checkpoint is None:
        raise HabitError(f"{run}: no complete checkpoint to resume from")
    d = info["data"]
    settings = from_dict(TrainSettings, info["settings"]["train"])
    if settings.method != "sft":
        table = load_preferences(d.get("path") or d["source"])
    else:
        table = load_examples(d.get("path") or d["source"], template=d.get("template_arg"),
                              response=d.get("response_arg"))
    if table.sha256 != d["sha256"]:
        raise HabitError(f"{d.get('path')}: the data changed since this run started (sha256 differs)")
    source = models.resolve(info["base"]["source"])
    if source.kind != "hub" and models.content_hash(source) != info["base"]["sha256"]:
        raise HabitError(f"{run}: base model '{source.given}' changed since this run started")
    lora = from_dict(LoraSettings, info["settings"]["lora"])
    source, lora, objective = _objective(table, info["base"]["source"], lora, settings)
    return _fit(table, run, source, lora, settings, on_log, checkpoint=checkpoint, objective=objective)


def latest_checkpoint(run: Path) -> Path | None:
    """The newest checkpoints/step-N folder; temp folders of a write that was cut are ignored."""
    done = sorted(p for p in (run / "checkpoints").glob("step-*") if (p / "state.pt").is_file())
    return done[-1] if done else None


def schedule(encoded: Sequence[Encoded], width: int, batch_tokens: int, seed: int,
             planner: Callable = plan_epoch):
    """Yield (epoch, fraction of the epoch done, the step's rows as one Batch, epoch end) forever.
    A step holds `batch_tokens` in total, whatever the number of processes (`share` splits it);
    an epoch's last, shorter step is trained too. A pure function of its inputs: resuming at step
    N is skipping N items."""
    epoch = 0
    while True:
        steps = planner(encoded, width, batch_tokens, seed, epoch)
        for k, step in enumerate(steps):
            yield epoch, (k + 1) / len(steps), step, k + 1 == len(steps)
        epoch += 1


def share(step: Batch, rank: int, world: int, grad_accum: int) -> list[Batch]:
    """This process's micro-batches of one step: every world-th row, in up to `grad_accum` groups.
    Empty when the step has fewer rows than processes (the caller still joins the reduction)."""
    mine = step.rows[rank::world]
    if not mine:
        return []
    per = math.ceil(len(mine) / grad_accum)
    return [Batch(mine[i : i + per], step.width) for i in range(0, len(mine), per)]


class _StopFlag:
    """Ctrl-C / SIGTERM ask training to stop after the current step (and save); a second Ctrl-C
    interrupts at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        import signal
        import threading

        self.saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal

        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        import signal

        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        return False


def memory_plan(config, lora: LoraSettings, settings: TrainSettings, dtype,
                device: str, say: bool = True) -> memory.Estimate:
    """The memory estimate for this run, said on stderr before any weights load; decides
    `--grad-checkpointing auto` and refuses (one line saying what would fit) when it cannot fit."""
    import torch

    try:
        shape = memory.shape(config, lora)
    except Exception as e:  # a config transformers cannot build on the meta device: train unguarded
        if say:
            print(f"habit: no memory estimate for this base ({models._one_line(e)[:120]})",
                  file=sys.stderr)
        return memory.Estimate(0, 0, 0, 0, 0, settings.grad_checkpointing == "on")
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    need = memory.plan(shape, settings, dtype_bytes, memory.available(device))
    if say:
        print(f"habit: {need.describe()}", file=sys.stderr)
    return need


# --- the recipe: setup → plan → prepare → (step, validate, checkpoint)* → finish -------------------

class Objective:
    """What a step minimises, and what it needs around that. SFT: the summed token loss of each
    pass, divided by the step's target count over all processes. preference.PreferenceObjective
    has the same methods: setup (the data as sequences), width and planner (the rows), adapter
    (the one training starts from), start (what to compute before the first step), logged (step
    metrics), describe (run.json's data section)."""

    name = "sft"

    def setup(self, table, run: Path, source: models.Source, lora: LoraSettings,
              settings: TrainSettings) -> "Setup":
        return setup(table, run, source, lora, settings)

    def width(self, encoded: Sequence[Encoded], max_len: int) -> int:
        return row_width(encoded, max_len)

    def planner(self, encoded, width: int, micro_tokens: int, seed: int, epoch: int,
                shuffle: bool = True) -> list[Batch]:
        return plan_epoch(encoded, width, micro_tokens, seed, epoch, shuffle)

    def adapter(self, base, lora: LoraSettings):
        return adapters.attach(base, lora)

    def check_loss(self, model, batch: Batch, pad_id: int, device, fast):
        return batch_loss(model, batch, pad_id, device, fast)

    def start(self, s: "Setup", t: "Trainer", run: Path, resumed: bool) -> None:
        pass

    def before_step(self, s: "Setup", t: "Trainer", work: list) -> None:
        pass

    def count(self, batch: Batch) -> int:
        """The step's normaliser: what its loss is a mean over."""
        return batch.targets

    def loss(self, model, batch: Batch, pad_id: int, device, fast: fastpath.FastPaths | None):
        """(summed loss of one pass, the count it covers)."""
        return batch_loss(model, batch, pad_id, device, fast)

    def logged(self, accelerator, prefix: str = "") -> dict:
        """Metrics the passes since the last call gathered, over all processes (a collective)."""
        return {}

    def describe(self, table: Table, s: "Setup") -> dict:
        """run.json's account of the data (and anything an objective adds or overrides)."""
        return {"data": {"source": table.source, "path": _abspath(table.source), "shape": table.shape,
                         "sha256": table.sha256, "template_arg": _template_arg(table),
                         "response_arg": table.response,
                         "examples": len(table.examples), "duplicates_dropped": table.duplicates,
                         "train": len(s.train_enc), "val": len(s.val_enc),
                         "too_long_dropped": [list(d) for d in s.dropped + s.val_dropped]}}


@dataclass
class Setup:
    """The processes, the base model and the data as token ids: built once, before any plan."""

    accelerator: object
    dtype: object
    need: memory.Estimate
    base: object
    tokenizer: object
    template: Template
    stop: list
    train_ex: list
    val_ex: list
    train_enc: list
    val_enc: list
    dropped: list  # (example, tokens) too long for --max-len
    val_dropped: list
    shard: str = "none"

    @property
    def device(self):
        return self.accelerator.device

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def sharded(self) -> bool:
        """--shard fsdp with several processes (one process has nothing to shard across)."""
        return self.shard == "fsdp" and self.world > 1


def setup(table: Table, run: Path, source: models.Source, lora: LoraSettings,
          settings: TrainSettings) -> Setup:
    train_ex, val_ex = split(table, settings.val_frac, settings.seed)
    if not train_ex:
        raise HabitError(f"{table.source}: no training examples left after the validation split")
    accelerator, dtype, need, base, tokenizer = runtime(run, source, lora, settings)
    template = choose_template(table, tokenizer)
    stop = models.stop_ids(tokenizer, base)
    train_enc, dropped = encode_all(train_ex, template, tokenizer, stop, settings.max_len,
                                    settings.train_on_prompt)
    val_enc, val_dropped = encode_all(val_ex, template, tokenizer, stop, settings.max_len,
                                      settings.train_on_prompt)
    if not train_enc:
        raise HabitError(f"{table.source}: every example is longer than --max-len {settings.max_len}")
    return Setup(accelerator, dtype, need, base, tokenizer, template, stop, train_ex, val_ex,
                 train_enc, val_enc, dropped, val_dropped, settings.shard)


def runtime(run: Path, source: models.Source, lora: LoraSettings, settings: TrainSettings):
    """(accelerator, dtype, memory estimate, base, tokenizer): the processes and the base model."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    log_with = None if settings.report_to == "none" else settings.report_to
    # accelerate only forms a CPU process group (gloo) when told cpu=True; without it, torchrun
    # on a machine with no GPU would start N independent single-process runs.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(log_with=log_with, project_dir=str(run), cpu=multi_cpu)
    if accelerator.distributed_type.name in ("DEEPSPEED", "FSDP"):
        # both engines take over the parameters in prepare(), after habit has made its fp32
        # masters; --shard fsdp is the sharding habit runs and tests
        raise HabitError(f"accelerate's {accelerator.distributed_type.name} engine is not supported: "
                         "launch with a plain multi-GPU (DDP) config and add --shard fsdp")
    set_seed(settings.seed)
    device = accelerator.device
    dtype = models.best_dtype(settings.precision, device.type)
    # one config read: an architecture outside habit/archs.py stops here, before any weights load
    # (a resumed run too), and the same config sizes the memory estimate
    config = models.check_arch(source)
    need = memory_plan(config, lora, settings, dtype, str(device), say=accelerator.is_main_process)
    base, tokenizer = models.load_model(source, dtype=dtype, device=str(device),
                                        quantize=settings.quantize)
    return accelerator, dtype, need, base, tokenizer


@dataclass
class Plan:
    """How the data becomes steps: the row width, the step count and when to validate."""

    width: int
    steps_per_epoch: int
    total: int
    val_every: int
    first_step: Batch  # the fast paths are checked on it
    val_batches: list  # this process's share of the validation set


def plan(s: Setup, settings: TrainSettings, objective: Objective) -> Plan:
    width = objective.width(s.train_enc + s.val_enc, settings.max_len)
    micro = settings.batch_tokens // settings.grad_accum
    first_epoch = objective.planner(s.train_enc, width, settings.batch_tokens, settings.seed, 0)
    total = settings.steps or max(1, math.ceil(settings.epochs * len(first_epoch)))
    val_batches = objective.planner(s.val_enc, width, micro, settings.seed, 0,
                                    shuffle=False)[s.rank::s.world]
    val_every = settings.val_every or max(1, total // VAL_POINTS)
    return Plan(width, len(first_epoch), total, val_every, first_epoch[0], val_batches)


@dataclass
class Trainer:
    """The trainable state: the adapted model, the fast paths that passed their check, the fp32
    master weights with their optimizer and schedule, the best adapter so far, and the progress."""

    model: object
    fast: fastpath.FastPaths
    fast_diff: float | None
    weights: MasterWeights
    optimizer: object
    scheduler: object
    best: Best
    step: int = 0  # optimizer steps done
    seen_tokens: int = 0
    computed_tokens: int = 0  # what the model ran on: real tokens less the repeats of a shared prefix
    compiled: object = None  # fastpath.Compiled: the decoder layers compiled for the training step
    compile_note: str | None = None  # why they are not, or how far compiled was from eager


def prepare(s: Setup, p: Plan, lora: LoraSettings, settings: TrainSettings,
            checkpoint: Path | None, objective: Objective) -> Trainer:
    """The adapter on the base, the fast paths checked against the plain path, the optimizer; then
    a checkpoint's state when resuming."""
    import torch

    model = objective.adapter(s.base, lora)
    model.train()
    fast, fast_diff = _fast_paths(s, p, model, settings, objective.check_loss)
    compiled, compile_note = _compiled(s, p, model, settings, fast, objective.check_loss)
    if s.sharded:
        model = sharding.shard(model, s.dtype)  # fp32 LoRA shards: MasterWeights then holds no copies
    weights = MasterWeights([(n, q) for n, q in model.named_parameters() if q.requires_grad])
    # fused: one kernel per tensor instead of ~10 ops (a CPU step spent ~60 ms in the optimizer)
    optimizer = torch.optim.AdamW(weights.master, lr=settings.lr, weight_decay=settings.weight_decay,
                                  fused=s.device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_at(k, p.total, settings.warmup))
    t = Trainer(model, fast, fast_diff, weights, optimizer, scheduler, Best(), compiled=compiled,
                compile_note=compile_note)
    if checkpoint is not None:
        t.step, t.seen_tokens = load_checkpoint(checkpoint, weights, optimizer, scheduler, t.best)
        t.computed_tokens = t.seen_tokens
    if not s.sharded:  # DDP where there are several processes; a sharded model is already distributed
        t.model, t.optimizer = s.accelerator.prepare(model, optimizer)
    return t


def _fast_paths(s: Setup, p: Plan, model, settings: TrainSettings,
                loss_fn: Callable) -> tuple[fastpath.FastPaths, float | None]:
    """The fast paths this run may use, and their largest difference from the plain path on the
    first step (None when none is on). All of them off when that check fails."""
    fast = fastpath.FastPaths() if settings.plain_path else fastpath.setup(model, s.device.type)
    if s.need.checkpointing:
        adapters.checkpoint_activations(model)
        fast = fast.recomputable()
    if fast.attention:
        fast = dataclasses.replace(fast, prefix=fastpath.shared_prefix(s.train_enc + s.val_enc))
    if s.sharded:
        # merged LoRA and the head loss read whole weights inside their own backward; ZeRO-3 and
        # FSDP shard weights between forward and backward (the fused norm keeps its weight for its
        # backward). Attention per example is unaffected.
        fast = fastpath.FastPaths(attention=fast.attention, prefix=fast.prefix)
    if not fast.names():
        return fast, None
    # before a checkpoint restores the RNG state: the check must not shift a resumed run
    agreed, diff = check_fast(model, p.first_step, s.pad_id, s.device, fast, loss_fn)
    agreed = _agree(s.accelerator, agreed, False, 0.0, 0)[0]  # the same paths on every rank
    return (fast if agreed else fastpath.FastPaths()), diff


def _compiled(s: Setup, p: Plan, model, settings: TrainSettings, fast: fastpath.FastPaths,
              loss_fn: Callable) -> tuple[fastpath.Compiled | None, str | None]:
    """The decoder layers compiled for the training step, when --compile asks for it (auto: a
    CPU run of at least COMPILE_MIN_STEPS steps) and they agree with eager on the first batch;
    else None. With a note: why not, or the check's difference."""
    if settings.compile == "off":
        return None, None
    why = fastpath.compile_unavailable(s.device.type)
    if s.sharded or s.need.checkpointing:
        why = "sharded models and gradient checkpointing train eager"
    if settings.compile == "auto" and (why or s.device.type != "cpu" or p.total < fastpath.COMPILE_MIN_STEPS):
        return None, why
    if why:
        print(f"habit: --compile on: not compiling, {why}", file=sys.stderr)
        return None, why
    compiled = fastpath.Compiled(model)
    try:
        agreed, diff = check_compiled(model, p.first_step, s.pad_id, s.device, fast, compiled, loss_fn)
    except Exception as e:  # noqa: BLE001 - a compiler that fails to build is a reason to run eager
        agreed, diff, why = False, None, f"compiling failed: {models._one_line(e)[:160]}"
        model.zero_grad(set_to_none=True)
    agreed = _agree(s.accelerator, agreed, False, 0.0, 0)[0]  # the same on every rank
    if not agreed:
        why = why or f"the compiled layers differed from eager by {diff:.3g} on the first batch"
        print(f"habit: training eager: {why}", file=sys.stderr)
        return None, why
    return compiled, f"agrees with eager to {diff:.2g}"


@dataclass
class StepResult:
    loss: float  # mean over the step's count, all processes together
    stopping: bool  # some process was asked to stop (Ctrl-C, SIGTERM)


def train_step(s: Setup, t: Trainer, step_batch: Batch, settings: TrainSettings,
               stop_requested: bool, objective: Objective) -> StepResult:
    """One optimizer step over one step's rows: this process's share in passes, gradients reduced
    once, a check that all is finite, clipping, AdamW, and the fp32 masters back into the model."""
    import torch

    mine = share(step_batch, s.rank, s.world, settings.grad_accum)
    # the step's loss is its summed losses over ALL its targets: each process divides by the
    # global count, times `world` because DDP averages the processes' gradients (a mean of
    # per-process means would weight examples unlike one process does)
    scale = s.world / max(1, objective.count(step_batch))
    my_count = sum(objective.count(b) for b in mine)
    step_loss = 0.0
    work = [part for batch in mine for part in passes(batch, settings.micro_tokens)]
    # fewer rows than processes: a zero-weight pass still joins the gradient reduction
    real = len(work)
    work = work or [Batch(step_batch.rows[:1], step_batch.width)]
    objective.before_step(s, t, work[:real])
    if s.sharded:  # every process runs as many passes: each forward gathers weights from all of them
        work += [work[0]] * (_most(s.accelerator, len(work)) - len(work))
    compiled = t.compiled.active() if t.compiled is not None else contextlib.nullcontext()
    with t.fast.fixed_weights(), compiled:
        for k, part in enumerate(work):
            sync = k == len(work) - 1  # gradients are reduced once, after the step's last pass
            weight = scale if k < real else 0.0  # an idle process's pass, or a sharded filler
            with _no_sync(s, t.model, sync):
                loss, _ = objective.loss(t.model, part, s.pad_id, s.device, t.fast)
                s.accelerator.backward(loss * weight)
            step_loss += float(loss.detach()) if k < real else 0.0
    t.seen_tokens += step_batch.tokens
    t.computed_tokens += sum(q.computed(t.fast.prefix) for r in range(s.world)
                             for b in share(step_batch, r, s.world, settings.grad_accum)
                             for q in passes(b, settings.micro_tokens))
    t.weights.grads_to_master()
    # one number says whether any gradient is inf/nan: their total norm
    norm = torch.nn.utils.get_total_norm([m.grad for m in t.weights.master if m.grad is not None])
    finite, stopping, step_loss, count = _agree(
        s.accelerator, math.isfinite(step_loss) and bool(torch.isfinite(sharding.full(norm))), stop_requested,
        step_loss, my_count)
    if not finite:
        raise HabitError(f"step {t.step + 1}: the loss or a gradient is not finite (loss "
                         f"{step_loss / max(1, count):.4g}); try a lower --lr. The last "
                         "checkpoint is intact: habit train --resume can continue from it")
    if settings.max_grad_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(t.weights.master, settings.max_grad_norm, norm)
    t.optimizer.step()
    t.scheduler.step()
    t.weights.master_to_model()
    t.optimizer.zero_grad(set_to_none=True)
    t.model.zero_grad(set_to_none=True)
    t.step += 1
    return StepResult(step_loss / max(1, count), stopping)


def _no_sync(s: Setup, model, sync: bool):
    """No gradient reduction in this pass unless `sync` (the step's last pass)."""
    if s.world == 1 or sync:
        if s.sharded:
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if s.sharded:
        model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return s.accelerator.no_sync(model)


def _most(accelerator, n: int) -> int:
    """The largest `n` over the processes."""
    import torch

    return int(accelerator.reduce(torch.tensor([n], device=accelerator.device), "max")[0])


def validate(s: Setup, t: Trainer, p: Plan, objective: Objective) -> float | None:
    """Validation loss over every process's share; the best adapter so far is kept."""
    batches = p.val_batches
    if s.sharded:  # as many forwards on every process; a filler's loss is not counted
        batches = batches + [None] * (_most(s.accelerator, len(batches)) - len(batches))
    val_loss = _eval_across(s.accelerator, t.model, batches, s.pad_id, s.device, t.fast, p.first_step,
                            objective.loss)
    t.best.offer(t.step, val_loss, t.weights)
    return val_loss


def run_info(table: Table, source: models.Source, s: Setup, p: Plan, t: Trainer,
             lora: LoraSettings, settings: TrainSettings, objective: Objective) -> dict:
    """run.json: what was trained on what, with which settings and plan, on which versions."""
    return {
        "status": "running",
        "base": {"source": source.given, "kind": source.kind, "sha256": models.content_hash(source)},
        "template": s.template.to_dict(),
        "template_text": s.template.describe(),
        **objective.describe(table, s),
        "settings": {"lora": as_dict(lora), "train": as_dict(settings)},
        "plan": {"steps": p.total, "steps_per_epoch": p.steps_per_epoch, "row_width": p.width,
                 "processes": s.world, "sharded": s.sharded, "dtype": str(s.dtype).replace("torch.", ""),
                 "quantize": settings.quantize, "grad_checkpointing": s.need.checkpointing,
                 "memory_estimate_gb": round(s.need.total / 1e9, 2) or None,
                 "fast_paths": t.fast.names(),
                 "fast_check": round(t.fast_diff, 6) if t.fast_diff is not None else None,
                 "compiled": t.compiled is not None, "compile_note": t.compile_note,
                 "malloc": allocator.describe()},
        "versions": versions(),
    }


def open_run(run: Path, info: dict, force: bool, resumed_from: int | None) -> None:
    """Create the run directory, or, resuming, forget what the cut run logged after its last
    checkpoint and its half-written checkpoints; then write run.json."""
    if resumed_from is None:
        rundir.create(run, force)
        (run / "checkpoints").mkdir(exist_ok=True)
    else:
        for tmp in (run / "checkpoints").glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
        kept = [r for r in rundir.read_jsonl(run / rundir.METRICS_FILE) if r.get("step", 0) <= resumed_from]
        rundir.write_atomic(run / rundir.METRICS_FILE,
                            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
        info["resumed_from"] = resumed_from
    rundir.write_json(run / rundir.RUN_FILE, info)


def _fit(table: Table, run: Path, source: models.Source, lora: LoraSettings,
         settings: TrainSettings, on_log: Callable[[dict], None] | None, force: bool = False,
         checkpoint: Path | None = None, objective: Objective | None = None) -> TrainResult:
    objective = objective or Objective()
    s = objective.setup(table, run, source, lora, settings)
    p = plan(s, settings, objective)
    t = prepare(s, p, lora, settings, checkpoint, objective)
    info = run_info(table, source, s, p, t, lora, settings, objective)
    log_with = None if settings.report_to == "none" else settings.report_to
    if s.main:
        open_run(run, info, force, None if checkpoint is None else t.step)
        if log_with:
            s.accelerator.init_trackers("habit", config=_flat(info["settings"]))
    s.accelerator.wait_for_everyone()
    objective.start(s, t, run, resumed=checkpoint is not None)

    def log(row: dict) -> None:
        if s.main:
            rundir.append_jsonl(run / rundir.METRICS_FILE, row)
            if log_with:
                s.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))},
                                  step=row.get("step"))
            if on_log:
                on_log(row)

    start, start_tokens = time.perf_counter(), t.seen_tokens
    train_loss = val_loss = None
    steps = itertools.islice(schedule(s.train_enc, p.width, settings.batch_tokens, settings.seed,
                                      objective.planner), t.step, p.total)
    with _StopFlag() as stop_flag:
        for epoch, done, step_batch, epoch_end in steps:
            out = train_step(s, t, step_batch, settings, stop_flag.requested, objective)
            train_loss, elapsed, last = out.loss, time.perf_counter() - start, t.step == p.total
            log({"step": t.step, "epoch": round(epoch + done, 3), "loss": round(train_loss, 5),
                 "lr": t.scheduler.get_last_lr()[0], "tokens": t.seen_tokens,
                 "tokens_computed": t.computed_tokens,
                 "tokens_per_s": round((t.seen_tokens - start_tokens) / elapsed, 1),
                 "elapsed_s": round(elapsed, 2), "total_steps": p.total,
                 **objective.logged(s.accelerator)})
            if settings.eval_every and (t.step % settings.eval_every == 0 or last):
                if s.main:
                    log({"step": t.step, **probe(s.accelerator.unwrap_model(t.model), s.tokenizer,
                                                 s.template, s.stop, s.val_ex or s.train_ex)})
                s.accelerator.wait_for_everyone()
            if s.val_enc and (epoch_end or last or t.step % p.val_every == 0):  # same on every rank
                val_loss = validate(s, t, p, objective)
                log({"step": t.step, "epoch": round(epoch + done, 3), "val_loss": round(val_loss, 5),
                     **objective.logged(s.accelerator, "val_")})
            due = t.step % settings.save_every == 0 if settings.save_every else epoch_end
            if due or last or out.stopping:
                save_checkpoint(s.accelerator, t.model, t.weights, t.optimizer, t.scheduler, run,
                                t.step, settings.keep_checkpoints, t.seen_tokens, t.best)
            if out.stopping and not last:
                if s.main:
                    rundir.write_json(run / rundir.RUN_FILE, info | {"status": "interrupted",
                                                                     "stopped_at": t.step})
                raise Interrupted(f"stopped at step {t.step}/{p.total}; checkpoint saved. "
                                  f"Continue with: habit train --resume {run}")
    result = finish(s, p, t, run, info, settings, train_loss, val_loss,
                    time.perf_counter() - start, start_tokens)
    if log_with:
        s.accelerator.end_training()
    return result


def finish(s: Setup, p: Plan, t: Trainer, run: Path, info: dict, settings: TrainSettings,
           train_loss: float | None, val_loss: float | None, elapsed: float,
           start_tokens: int) -> TrainResult:
    """The run's adapter (the best validated one under --keep best) and run.json marked done."""
    kept = t.best if settings.keep == "best" and t.best.step is not None else None
    result = TrainResult(str(run), train_loss, val_loss,
                         round((t.seen_tokens - start_tokens) / max(elapsed, 1e-9), 1), p.total,
                         len(s.train_enc), len(s.val_enc),
                         [list(d) for d in s.dropped], round(elapsed, 2),
                         t.fast.names(), t.fast_diff, kept.step if kept else p.total,
                         kept.loss if kept else val_loss)
    final = kept.weights if kept else t.weights.state_dict()  # every process: shards are gathered
    if s.main:
        adapters.save(s.accelerator.unwrap_model(t.model), run, final)
        info.update(status="done", result=result.to_dict())
        rundir.write_json(run / rundir.RUN_FILE, info)
    s.accelerator.wait_for_everyone()
    return result


def _agree(accelerator, finite: bool, stopping: bool, loss: float,
           targets: int) -> tuple[bool, bool, float, int]:
    """One reduction per step: whether every rank's loss and gradients are finite, whether any
    rank was asked to stop, and the global loss sum and target count. All ranks then take the
    same branch (stop, or raise on NaN); a branch taken by one rank alone deadlocks DDP."""
    if accelerator.num_processes == 1:
        return finite, stopping, loss, targets
    import torch

    flags = torch.tensor([0.0 if finite else 1.0, 1.0 if stopping else 0.0,
                          loss if finite else 0.0, float(targets)], dtype=torch.float64)
    flags = accelerator.reduce(flags.to(accelerator.device), "sum")
    return bool(flags[0] == 0), bool(flags[1] > 0), float(flags[2]), int(flags[3])


# How far --eval-every's generation probe looks: a few fixed prompts, enough tokens for typical answers.
PROBE_PROMPTS = 8
PROBE_TOKENS = 256


def probe(model, tokenizer, template: Template, stop: Sequence[int], examples: Sequence[Example]) -> dict:
    """A small greedy generation eval during training (--eval-every): on the first few held-out
    examples, how often the model stops by itself, opens like the references, and loops."""
    from habit.generation import generate
    from habit.render import example_answer, example_prompt
    from habit.settings import GenerationSettings

    chosen = list(examples[:PROBE_PROMPTS])
    refs = [example_answer(e, template) for e in chosen]
    prompts = [example_prompt(e, template, tokenizer) for e in chosen]
    was_training = model.training
    model.eval()
    gens = generate(model, tokenizer, template, prompts, stop,
                    GenerationSettings(max_new_tokens=PROBE_TOKENS))
    model.train(was_training)
    texts = [g.text for g in gens]
    expect = metrics.common_prefix(refs, min_share=metrics.PREFIX_SHARE) if len(refs) > 1 else None
    return {"gen_stop_rate": metrics.stopped_rate([g.finish_reason for g in gens]),
            "gen_expectation_rate": metrics.expectation_rate(texts, expect) if expect else None,
            "gen_loop_rate": metrics.loop_rate(texts), "gen_n": len(gens)}


class MasterWeights:
    """fp32 master copies of low-precision trainable weights.

    The model computes with bf16 LoRA weights (fast, no casts); the optimizer steps fp32 copies,
    which are copied back after each step. A bf16 weight alone would round away updates smaller
    than ~1/256 of its size, and AdamW's late, small steps are exactly those.
    """

    def __init__(self, named_params):
        import torch

        self.names, self.params = zip(*named_params)
        self.master = [p if p.dtype == torch.float32 else p.detach().float().requires_grad_(True)
                       for p in self.params]

    def grads_to_master(self) -> None:
        for p, m in zip(self.params, self.master):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()

    def master_to_model(self) -> None:
        import torch

        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                if m is not p:
                    p.copy_(m)

    def state_dict(self) -> dict:
        """Parameter names → fp32 masters, for saving adapters at full precision (whole tensors:
        sharded ones are gathered, a collective every process must join)."""
        return {name: sharding.full(m.detach()) for name, m in zip(self.names, self.master)}


class Best:
    """The validated adapter with the lowest validation loss so far: its step, loss and fp32 LoRA
    weights (a copy: a few MB for rank-16 adapters). Checkpoints carry it, so a resumed run keeps
    the same one."""

    def __init__(self):
        self.step, self.loss, self.weights = None, None, None

    def offer(self, step: int, loss: float | None, weights: MasterWeights) -> None:
        if loss is not None and (self.loss is None or loss < self.loss):
            self.step, self.loss = step, loss
            self.weights = {k: v.detach().clone() for k, v in weights.state_dict().items()}

    def state(self) -> dict:
        return {"step": self.step, "loss": self.loss, "weights": self.weights}

    def restore(self, state: dict | None) -> None:
        if state:
            self.step, self.loss, self.weights = state["step"], state["loss"], state["weights"]


def save_checkpoint(accelerator, model, weights: MasterWeights, optimizer, scheduler, run: Path,
                    step: int, keep: int, seen_tokens: int = 0, best: Best | None = None) -> None:
    """checkpoints/step-N: adapter (fp32) + state.pt (master weights, optimizer, scheduler, RNG),
    written into a temp folder and renamed, so a kill mid-write leaves no half checkpoint."""
    import torch

    # shards are made whole on every process (a collective) before rank 0 alone writes them
    adapter_state = weights.state_dict()
    master = [sharding.full(m.detach()).clone() for m in weights.master]
    optimizer_state = sharding.gathered(optimizer.state_dict())
    if not accelerator.is_main_process:
        return
    folder = run / "checkpoints"
    final = folder / f"step-{step:07d}"
    if final.exists():
        return
    tmp = folder / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    adapters.save(accelerator.unwrap_model(model), tmp, adapter_state)
    state = {"step": step, "seen_tokens": seen_tokens, "master": master,
             "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
             "rng": torch.get_rng_state(), "python_rng": random.getstate(),
             "best": best.state() if best else None}
    torch.save(state, tmp / "state.pt.tmp")
    os.replace(tmp / "state.pt.tmp", tmp / "state.pt")
    os.replace(tmp, final)
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, weights: MasterWeights, optimizer, scheduler,
                    best: Best | None = None) -> tuple[int, int]:
    """Restore a checkpoint into fresh training objects; returns (completed steps, tokens seen)."""
    import torch

    try:
        state = torch.load(folder / "state.pt", weights_only=False)
    except Exception as e:
        raise HabitError(f"{folder}: cannot read checkpoint ({models._one_line(e)})") from None
    if len(state["master"]) != len(weights.master):
        raise HabitError(f"{folder}: checkpoint does not match the model's LoRA weights")
    with torch.no_grad():
        for m, saved in zip(weights.master, state["master"]):
            m.copy_(sharding.like(saved, m))
    weights.master_to_model()
    params = [q for group in optimizer.param_groups for q in group["params"]]
    saved_opt = state["optimizer"]
    saved_opt["state"] = {k: {n: sharding.like(v, params[k]) for n, v in s.items()}
                          for k, s in saved_opt["state"].items()}
    optimizer.load_state_dict(saved_opt)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    random.setstate(state["python_rng"])
    if best is not None:
        best.restore(state.get("best"))
    return state["step"], state["seen_tokens"]


def _eval_across(accelerator, model, batches: Sequence[Batch | None], pad_id: int, device,
                 fast: fastpath.FastPaths | None = None, filler: Batch | None = None,
                 loss_fn: Callable | None = None) -> float | None:
    """Validation loss over every rank's share. Every rank joins the reduction, even one whose
    share is empty: a collective that only some ranks call hangs or garbles DDP."""
    # the unwrapped model: DDP's forward broadcasts buffers, a collective of its own
    total, count = eval_sums(accelerator.unwrap_model(model), batches, pad_id, device, fast, filler,
                             loss_fn)
    if accelerator.num_processes > 1:
        import torch

        sums = accelerator.reduce(torch.tensor([total, float(count)], device=accelerator.device), "sum")
        total, count = float(sums[0]), int(sums[1])
    return total / count if count else None


def _abspath(source: str) -> str:
    return os.path.abspath(source) if os.path.exists(source) else source


def _template_arg(table: Table) -> str | None:
    """The --template a later command needs to read the same data the same way (None: inferred)."""
    if not table.text_template:
        return None
    return f"{table.prompt_format}{{{table.response}}}"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
