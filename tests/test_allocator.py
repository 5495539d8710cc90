"""habit.allocator: which malloc the `habit` command re-executes on, and that it really does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from habit import allocator, bench
from habit.errors import HabitError

TCMALLOC = "libtcmalloc_minimal.so.4"


def _find(*installed):
    return lambda name: f"lib{name}.so.4" if name in installed else None


def test_auto_prefers_tcmalloc_then_jemalloc_then_none():
    assert allocator.choose({}, _find("tcmalloc_minimal", "jemalloc")) == TCMALLOC
    assert allocator.choose({}, _find("jemalloc")) == "libjemalloc.so.4"
    assert allocator.choose({}, _find()) is None
    assert allocator.choose({"HABIT_MALLOC": "system"}, _find("tcmalloc_minimal")) is None


def test_a_named_library_must_exist(tmp_path):
    lib = tmp_path / "libmy.so"
    lib.write_bytes(b"")
    assert allocator.choose({"HABIT_MALLOC": str(lib)}, _find()) == str(lib)
    with pytest.raises(HabitError, match=r"HABIT_MALLOC=.*nope\.so: no such file"):
        allocator.choose({"HABIT_MALLOC": str(tmp_path / "nope.so")}, _find())


def test_preload_env_adds_the_library_once_and_only_on_linux():
    env = allocator.preload_env({"LD_PRELOAD": "libother.so", "A": "1"}, "linux", None, _find("tcmalloc_minimal"))
    assert env["LD_PRELOAD"] == f"{TCMALLOC}:libother.so" and env["A"] == "1"
    assert env[allocator.LOADED] == TCMALLOC
    # the re-executed process does not go round again, nor does one already on a replacement
    assert allocator.preload_env(env, "linux", None, _find("tcmalloc_minimal")) is None
    assert allocator.preload_env({}, "linux", "jemalloc", _find("tcmalloc_minimal")) is None
    assert allocator.preload_env({}, "darwin", None, _find("tcmalloc_minimal")) is None
    assert allocator.preload_env({}, "linux", None, _find()) is None


def test_without_takes_out_only_habits_preload():
    env = allocator.preload_env({"LD_PRELOAD": "libother.so"}, "linux", None, _find("tcmalloc_minimal"))
    plain = allocator.without(env)
    assert plain["LD_PRELOAD"] == "libother.so" and plain["HABIT_MALLOC"] == "system"
    assert allocator.LOADED not in plain
    alone = allocator.without(allocator.preload_env({}, "linux", None, _find("tcmalloc_minimal")))
    assert "LD_PRELOAD" not in alone


def test_active_reads_the_mapped_libraries():
    maps = ("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
            "7f02-7f03 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n")
    assert allocator.active(maps) == "tcmalloc_minimal"
    assert allocator.active("7f00-7f01 r-xp 0 08:01 1 /usr/lib/libc.so.6\n") is None


def test_bench_runs_the_tutorial_and_trl_on_the_system_malloc(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", TCMALLOC)
    monkeypatch.setenv(allocator.LOADED, TCMALLOC)
    for kind in ("recipe", "trl", "habit-sysmalloc"):
        env = bench.malloc_env(kind)
        assert "LD_PRELOAD" not in env and env["HABIT_MALLOC"] == "system"
    assert bench.malloc_env("habit")["LD_PRELOAD"] == TCMALLOC


def _installed() -> str | None:
    try:
        return allocator.choose({})
    except HabitError:
        return None


@pytest.mark.skipif(not sys.platform.startswith("linux") or _installed() is None,
                    reason="needs Linux with tcmalloc or jemalloc installed (apt-get install libtcmalloc-minimal4)")
def test_the_command_reexecutes_on_the_faster_malloc():
    env = {k: v for k, v in os.environ.items() if k not in ("HABIT_MALLOC", allocator.LOADED, "LD_PRELOAD")}
    found = subprocess.run([sys.executable, "-m", "habit", "--version"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert found.returncode == 0, found.stderr
    assert f"({allocator.active(_maps_of(_installed()))})" in found.stdout, found.stdout
    off = subprocess.run([sys.executable, "-m", "habit", "--version"], env={**env, "HABIT_MALLOC": "system"},
                         capture_output=True, text=True, timeout=120)
    assert "(system malloc (HABIT_MALLOC=system))" in off.stdout


def _maps_of(library: str) -> str:  # a /proc/self/maps line for the library: the name active() gives it
    return f"0-1 r-xp 0 0:0 0 /lib/{os.path.basename(library)}\n"


def test_a_missing_library_is_a_one_line_error(tmp_path):
    env = {**os.environ, "HABIT_MALLOC": str(tmp_path / "nope.so")}
    env.pop(allocator.LOADED, None)
    found = subprocess.run([sys.executable, "-m", "habit", "--version"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert found.returncode == 2
    assert found.stderr.strip().splitlines() == [f"habit: error: HABIT_MALLOC={tmp_path / 'nope.so'}: no such file "
                                                 "(auto, system, or a malloc library's path)"]
