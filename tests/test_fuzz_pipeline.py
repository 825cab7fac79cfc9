"""Hostile variants of the bundled pipeline.yaml: each is refused with FILE:LINE:COL lines (or loads,
when the variant happens to be valid), never with a traceback, and within a memory budget.

The variants are generated from a fixed seed, so a failure names a variant that can be replayed:
alias bombs, absurd numbers, booleans and other types where numbers belong, tabs, NUL bytes,
invalid UTF-8, deep nesting, huge strings and files, truncations and flipped bytes. The bulk is
loaded in-process (tracemalloc gives the memory); one variant of each kind that must fail also
goes through the real `levers validate`.
"""

from __future__ import annotations

import random
import re
import resource
import subprocess
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from levers.errors import SpecError
from levers.pipeline.loading import parse_pipeline
from tests.conftest import LEVERS

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = (ROOT / "pipeline.yaml").read_text()
SEED = 20_251_201
VARIANTS = 160
SHOWN = "pipeline.yaml"

# Generous on purpose: a legitimate file of the size limit loads in about 30 MB, while the alias
# bomb these tests guard against took gigabytes (and minutes). Memory is counted exactly, so the
# budget catches a blow-up whatever the machine's speed.
MEMORY_BUDGET_BYTES = 64 * 1024 * 1024
# A `levers validate` process refusing a file needs under 150 MB of address space, most of it the
# interpreter and levers' imports; on a busy machine, beside the others, it starts in seconds.
PROCESS_MEMORY_BUDGET_BYTES = 512 * 1024 * 1024
# A deadline for a hung process, not a speed target.
PROCESS_DEADLINE_S = 60.0

LOCATED = re.compile(rf"^{re.escape(SHOWN)}:[1-9]\d*:[1-9]\d*: \S")
# keys the model bounds: a number there can be made absurd, a boolean or the wrong type
BOUNDED_NUMBER = re.compile(
    r"\b(workers|semaphore|threads|timeout|retries|seconds|calls|call_seconds|fixed_seconds|cpu|ram_mb"
    r"|requests_per_minute|concurrency): (\d+(?:\.\d+)?)"
)


@dataclass(frozen=True)
class Variant:
    kind: str
    index: int
    raw: bytes
    must_fail: bool

    def __str__(self) -> str:
        return f"{self.kind}#{self.index} ({len(self.raw):,} bytes)"


Mutation = Callable[[random.Random, str], tuple[bytes, bool]]


def _swap_number(rng: random.Random, text: str, value: str) -> str:
    matches = list(BOUNDED_NUMBER.finditer(text))
    match = rng.choice(matches)
    return text[: match.start(2)] + value + text[match.end(2) :]


def absurd_number(rng: random.Random, text: str) -> tuple[bytes, bool]:
    value = rng.choice(
        ["2147483648", "18446744073709551616", str(10**30), "-1", "1e308", ".inf", "-.inf", ".nan",
         "9" * rng.randint(20, 6000), "0x7fffffffffffffff", str(rng.randint(10**6, 10**12))]
    )  # fmt: skip
    return _swap_number(rng, text, value).encode(), True


def boolean_for_number(rng: random.Random, text: str) -> tuple[bytes, bool]:
    value = rng.choice(["true", "false", "True", "FALSE", "&flag true", "!!bool true"])
    return _swap_number(rng, text, value).encode(), True


def wrong_type(rng: random.Random, text: str) -> tuple[bytes, bool]:
    value = rng.choice(
        [
            "[1, 2]",
            "{a: 1}",
            "'12'",
            "twelve",
            "2001-12-14",
            "!!binary AAAA",
            "!!set {a}",
            "''",
            "1:30",
            "12 seconds",
        ]
    )
    return _swap_number(rng, text, value).encode(), True


def alias_bomb(rng: random.Random, text: str) -> tuple[bytes, bool]:
    width = rng.randint(4, 10)
    levels = rng.randint(8, 12)
    indent = rng.choice(["    ", "      "])
    lines = [f"{indent}b0: &b0 [{', '.join(['lol'] * width)}]"]
    lines += [f"{indent}b{n}: &b{n} [{', '.join([f'*b{n - 1}'] * width)}]" for n in range(1, levels + 1)]
    bomb = "\n".join(lines)
    anchor = rng.choice(["    options:\n", "      max_pages: 2000\n", "limits:\n"])
    if anchor == "limits:\n":
        bomb = bomb.replace(indent, "  ")
    where = text.index(anchor) + len(anchor)
    return (text[:where] + bomb + "\n" + text[where:]).encode(), True


def recursive_alias(rng: random.Random, text: str) -> tuple[bytes, bool]:
    edited = text.replace("  chunking:\n", "  chunking: &loop\n", 1)
    return edited.replace("      model: claude-haiku-4-5", "      model: *loop", 1).encode(), True


def tabs(rng: random.Random, text: str) -> tuple[bytes, bool]:
    lines = text.splitlines(keepends=True)
    indented = [n for n, line in enumerate(lines) if line.startswith("    ")]
    for n in rng.sample(indented, rng.randint(1, 3)):
        lines[n] = "\t" + lines[n][rng.choice([2, 4]) :]
    return "".join(lines).encode(), False


def nul_bytes(rng: random.Random, text: str) -> tuple[bytes, bool]:
    raw = bytearray(text.encode())
    for _ in range(rng.randint(1, 4)):
        raw.insert(rng.randrange(len(raw)), 0)
    return bytes(raw), True


def invalid_utf8(rng: random.Random, text: str) -> tuple[bytes, bool]:
    raw = bytearray(text.encode())
    junk = rng.choice([b"\xff", b"\xfe\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\xf8\x88\x80\x80\x80"])
    raw[rng.randrange(len(raw)) : 0] = junk
    return bytes(raw), True


def deep_nesting(rng: random.Random, text: str) -> tuple[bytes, bool]:
    depth = rng.choice([rng.randint(70, 200), rng.randint(1000, 20_000)])
    opening, closing = rng.choice([("[", "]"), ("{a: ", "}")])
    nested = opening * depth + closing * depth
    return text.replace("max_pages: 2000", f"max_pages: {nested}", 1).encode(), True


def huge_string(rng: random.Random, text: str) -> tuple[bytes, bool]:
    size = rng.choice([rng.randint(1_000, 50_000), rng.randint(100_000, 300_000)])
    value = rng.choice(["a" * size, "'" + "b" * size + "'", '"' + "\\u00e9" * (size // 6) + '"'])
    target = rng.choice(["claude-haiku-4-5", "phases.chunking:chunk", "levers\n", "2000"])
    return text.replace(target, value + ("\n" if target.endswith("\n") else ""), 1).encode(), False


def oversized(rng: random.Random, text: str) -> tuple[bytes, bool]:
    padding = "# " + "x" * 78 + "\n"
    return (text + padding * (1_000_000 // len(padding) + rng.randint(1, 50_000))).encode(), True


def truncated(rng: random.Random, text: str) -> tuple[bytes, bool]:
    raw = text.encode()
    return raw[: rng.randrange(len(raw))], False


def flipped_bytes(rng: random.Random, text: str) -> tuple[bytes, bool]:
    raw = bytearray(text.encode())
    for _ in range(rng.randint(1, 8)):
        raw[rng.randrange(len(raw))] = rng.randrange(256)
    return bytes(raw), False


def shuffled_lines(rng: random.Random, text: str) -> tuple[bytes, bool]:
    lines = text.splitlines(keepends=True)
    for _ in range(rng.randint(1, 4)):
        a, b = rng.randrange(len(lines)), rng.randrange(len(lines))
        lines[a], lines[b] = lines[b], lines[a]
    return "".join(lines).encode(), False


MUTATIONS: dict[str, Mutation] = {
    "absurd_number": absurd_number,
    "boolean_for_number": boolean_for_number,
    "wrong_type": wrong_type,
    "alias_bomb": alias_bomb,
    "recursive_alias": recursive_alias,
    "tabs": tabs,
    "nul_bytes": nul_bytes,
    "invalid_utf8": invalid_utf8,
    "deep_nesting": deep_nesting,
    "huge_string": huge_string,
    "oversized": oversized,
    "truncated": truncated,
    "flipped_bytes": flipped_bytes,
    "shuffled_lines": shuffled_lines,
}
# the big ones cost about a second each: fewer of them
WEIGHTS = {"oversized": 1, "huge_string": 2, "deep_nesting": 3}


def variants() -> list[Variant]:
    rng = random.Random(SEED)
    kinds = list(MUTATIONS)
    weights = [WEIGHTS.get(kind, 8) for kind in kinds]
    made = [Variant("bundled", 0, BUNDLED.encode(), must_fail=False)]
    for index in range(1, VARIANTS):
        kind = rng.choices(kinds, weights)[0]
        raw, must_fail = MUTATIONS[kind](rng, BUNDLED)
        made.append(Variant(kind, index, raw, must_fail))
    return made


ALL = variants()


def test_the_variants_cover_every_kind() -> None:
    assert {v.kind for v in ALL} == {"bundled", *MUTATIONS}


def test_every_variant_loads_or_is_refused_with_located_lines_within_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / SHOWN
    failures: list[str] = []
    for variant in ALL:
        problem = _check_in_process(variant, path)
        if problem:
            failures.append(f"{variant}: {problem}")
    assert failures == []


def _check_in_process(variant: Variant, path: Path) -> str | None:
    tracemalloc.start()
    try:
        parse_pipeline(variant.raw, path)
        lines: list[str] = []
    except SpecError as exc:
        lines = str(exc).splitlines()
    except Exception as exc:  # the one thing this test is for: anything else is a finding
        return f"raised {type(exc).__name__}: {exc}"
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    if peak > MEMORY_BUDGET_BYTES:
        return f"took {peak / 1e6:.0f} MB"
    if variant.must_fail and not lines:
        return "loaded, but must be refused"
    unlocated = [line for line in lines if not LOCATED.match(line)]
    return f"lines without FILE:LINE:COL: {unlocated[:3]}" if unlocated else None


def sample() -> list[Variant]:
    """The first variant of each kind that must fail, for the real command."""
    firsts: dict[str, Variant] = {}
    for variant in ALL:
        if variant.must_fail:
            firsts.setdefault(variant.kind, variant)
    return list(firsts.values())


def test_levers_validate_exits_2_with_located_lines_and_no_traceback(tmp_path: Path) -> None:
    runs: list[tuple[Variant, subprocess.Popen[bytes], Path]] = []
    for variant in sample():  # all at once: most of each run is the interpreter starting
        directory = tmp_path / f"{variant.kind}-{variant.index}"
        directory.mkdir()
        (directory / SHOWN).write_bytes(variant.raw)
        runs.append((variant, _start([*LEVERS, "validate"], directory), directory))
    failures = [f"{variant}: {problem}" for variant, process, directory in runs
                if (problem := _check_run(process, directory))]  # fmt: skip
    assert failures == []


def _start(command: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    with (cwd / "stdout").open("w") as stdout, (cwd / "stderr").open("w") as stderr:
        return subprocess.Popen(command, cwd=cwd, stdout=stdout, stderr=stderr, preexec_fn=_memory_budget)


def _memory_budget() -> None:
    """In the child: past its address-space budget an allocation fails (a MemoryError traceback)."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (PROCESS_MEMORY_BUDGET_BYTES, hard))


def _check_run(process: subprocess.Popen[bytes], cwd: Path) -> str | None:
    """What is wrong with a `levers validate` run, or None."""
    try:
        code = process.wait(timeout=PROCESS_DEADLINE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return f"still running after {PROCESS_DEADLINE_S:.0f} s"
    stderr = (cwd / "stderr").read_text()
    lines = stderr.splitlines()
    if code != 2 or "Traceback" in stderr or not lines:
        return f"exit {code}: {stderr[-500:]}"
    unlocated = [line for line in lines if not LOCATED.match(line.removeprefix("error: "))]
    return f"lines without FILE:LINE:COL: {unlocated[:3]}" if unlocated else None
