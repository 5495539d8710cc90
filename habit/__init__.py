"""habit: teach a causal language model a new behaviour from a table of examples, with LoRA.

The public API mirrors the CLI:

    table = habit.load_examples("examples/roles.csv")
    result = habit.train(table, "runs/roles")
    run = habit.load_run("runs/roles")
    habit.compare(run, ["Linux Terminal"])

Heavy libraries (torch, transformers, peft) are imported inside the functions that use them, so
`import habit` and `habit --help` stay fast.
"""

__version__ = "0.1.0"

from habit.adapters import load_run
from habit.data import load_examples, split
from habit.errors import HabitError
from habit.generation import answer, compare, generate
from habit.models import load_model
from habit.settings import GenerationSettings, LoraSettings, TrainSettings
from habit.training import train

__all__ = ["HabitError", "load_examples", "split", "load_model", "train", "load_run", "generate",
           "answer", "compare", "LoraSettings", "TrainSettings", "GenerationSettings"]
