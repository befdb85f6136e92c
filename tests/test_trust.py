"""Trust boundaries (issue 26, items 1, 3, 4, 5; docs/trust.md): every reproduction is a case of one table
(command, expected exit code, expected first line, files before/after), driven through the CLI.

- data never runs code: a reward plug-in recorded in a buffer's or run's ``run.yaml`` is imported only
  when the user names it again or passes ``--trust-plugins`` (a file plug-in is pinned by its sha256);
- no file is replaced unasked (``stats --output``, ``model convert``, ``report``); ``collect --overwrite``
  takes the buffer's lock before anything is moved or deleted and starts afresh;
- a failed ``train`` / ``collect`` leaves nothing visible before its first durable result, and only what
  a re-run or ``--resume`` uses after it;
- bad input is one line (YAML, manifest parts, objective flags, NaN/inf settings, --frames, NaN adapters).

Unless a case says otherwise, the files under the case's folder (paths and sha256 of their bytes) must be
exactly as before the command."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from streamalign.buffer.collection import BufferBusyError, BufferLock
from streamalign.cli import app
from streamalign.collect.collector import locked_output
from streamalign.io.outputs import permit_overwrite
from streamalign.models import wan
from streamalign.rewards.sources import _LOADED, reward_of
from streamalign.schemas.config import ModelConfig
from streamalign.train.config import TrainConfig

SHAPES = str(ModelConfig.load("shapes").checkpoint)
PROMPT = "a red circle moving left on a black background"
GRAY = "a red circle moving left on a gray background"
TINY = ["--batch-groups", "1", "--lora-rank", "2", "--threads", "1"]
SEMI_EVAL = ["train", "--mode", "semi", "--steps", "1", "--eval-every", "1", "--eval-prompts", "1", *TINY]
ON = ["train", "--mode", "on", "--steps", "1", "-G", "2", *TINY]
BAR = re.compile(r"\d+%\|")  # a progress bar's line, not an error

EVIL = '''import pathlib
pathlib.Path(__file__).with_name("PWNED").write_text("code ran")  # what an attacker's plug-in does on import


def make(*args, **kwargs):
    return lambda videos, prompts: videos.float().flatten(1).mean(1)
'''

FAILING = '''"""Refuses prompts on a gray background; with fail_at=N, its N-th call fails."""


def make(fail_at=0):
    calls = [0]

    def score(videos, prompts):
        calls[0] += 1
        if any("gray" in p for p in prompts) or calls[0] == fail_at:
            raise ValueError(f"plug-in refuses call {calls[0]}")
        return videos.float().flatten(1).mean(1)

    return score
'''


def listing(root: Path) -> dict[str, str]:
    """Every path under `root` (hidden ones included): a file's sha256, a folder's '/'."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
            for p in sorted(root.rglob("*"))}  # fmt: skip


def invoke(args: list[str]):
    r = CliRunner().invoke(app, args)
    lines = [line for line in r.stderr.splitlines() if line.strip() and not BAR.search(line)]
    return r, lines


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """The inputs every case copies: a 2-shard buffer (1 group of 2 branches per shard), the plug-ins."""
    d = tmp_path_factory.mktemp("trust")
    buf = d / "buf"
    r, _ = invoke(["collect", "--out", str(buf), "--groups", "2", "-G", "2", "--entries-per-shard", "1",
                   "--threads", "1"])  # fmt: skip
    assert r.exit_code == 0, r.output
    (d / "failing.py").write_text(FAILING)
    (d / "prompts.txt").write_text(f"{PROMPT}\n{GRAY}\n")
    (d / "gray.txt").write_text(f"{GRAY}\n")
    return {"buf": buf, "failing": d / "failing.py", "prompts": d / "prompts.txt", "gray": d / "gray.txt"}


def recorded(root: Path, shared: dict, spec: str | None = None, pin: bool = False) -> Path:
    """A copy of the buffer whose run.yaml records a reward plug-in (default: `root`/evil.py, which writes
    `root`/PWNED when imported), as a buffer from someone else could."""
    b = root / "B"
    shutil.copytree(shared["buf"], b)
    evil = root / "evil.py"
    evil.write_text(EVIL)
    spec = spec or f"{evil}:make" + (f"#sha256={hashlib.sha256(evil.read_bytes()).hexdigest()}" if pin else "")
    record = yaml.safe_load((b / "run.yaml").read_text())
    record["config"]["collect"]["reward_plugins"] = {"evil": spec}
    record["config"]["collect"]["rewards"] += ",evil=1"
    (b / "run.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    return b


def changed_plugin(root: Path, shared: dict) -> Path:
    b = recorded(root, shared, pin=True)
    (root / "evil.py").write_text(EVIL + "# changed after it was recorded\n")
    return b


def buffer_copy(root: Path, shared: dict) -> Path:
    shutil.copytree(shared["buf"], root / "B")
    return root / "B"


def retyped(root: Path, shared: dict) -> Path:
    """The buffer with its second manifest part's `seed` column rewritten as strings."""
    b = buffer_copy(root, shared)
    part = b / "manifest" / "shard-000001.tar.parquet"
    t = pq.read_table(part)
    seed = pa.array([str(v) for v in t.column("seed").to_pylist()])
    pq.write_table(t.set_column(t.column_names.index("seed"), "seed", seed), part)
    return b


def garbage(root: Path, shared: dict) -> Path:
    b = buffer_copy(root, shared)
    (b / "manifest" / "shard-000001.tar.parquet").write_bytes(b"not a parquet file\n" * 8)
    return b


def ours(root: Path, shared: dict, edit: bool = False) -> Path:
    """s.csv written by an earlier `stats --output` (edited by hand afterwards when `edit`)."""
    b = buffer_copy(root, shared)
    r, _ = invoke(["stats", str(b), "--sql", "SELECT 1 AS one", "--format", "csv", "--output", str(root / "s.csv")])
    assert r.exit_code == 0, r.output
    if edit:
        (root / "s.csv").write_text("my notes\n")
    return b


def nan_adapter(root: Path) -> Path:
    """A peft adapter folder for the shapes model whose first tensor holds a NaN."""
    from streamalign.adapters.lora import LoraSettings, attach_lora, save_lora
    from streamalign.models.checkpoint import load_generator

    folder = save_lora(attach_lora(load_generator("shapes", SHAPES), LoraSettings(2, 4.0)), root / "nan-adapter")
    weights = folder / "adapter_model.safetensors"
    sd = load_file(str(weights))
    sd[sorted(sd)[0]][0, 0] = float("nan")
    save_file(sd, str(weights))
    return folder


@contextlib.contextmanager
def locked(folder: Path):
    """The buffer's lock held by a live writer (this process, through its own open file: flock locks
    are per open file, so the command under test meets it as another collect's)."""
    with BufferLock(folder):
        yield


@dataclass
class Case:
    """`setup(root, shared)` makes the case's inputs under `root` and returns what `args` needs; `args`
    builds the command line; `code`, `expect` (substrings of the first line); `after(root, before, now)`
    checks the files (default: exactly as before); `during`: a context held while the command runs."""

    setup: Callable[[Path, dict], object]
    args: Callable[[Path, dict, object], list[str]]
    code: int = 2
    expect: tuple[str, ...] = ()
    after: Callable[[Path, dict, dict], None] | None = None
    before_model: bool = False  # the check comes before any model loads (model construction forbidden)
    during: Callable[[Path, object], contextlib.AbstractContextManager] | None = None


def nothing(root: Path, shared: dict) -> None:
    return None


def added(*names: str) -> Callable[[Path, dict, dict], None]:
    """Exactly `names` (and what lies under them) are new; nothing else changed."""

    def check(root: Path, before: dict, now: dict) -> None:
        new = {k for k in now if k not in before}
        assert {k for k in new if not any(k == n or k.startswith(n + "/") for n in names)} == set(), new
        assert all(n in now for n in names), (names, sorted(now))
        assert {k: v for k, v in now.items() if k in before} == before

    return check


def scored_with_plugin(root: Path, before: dict, now: dict) -> None:
    """The trusted plug-in ran (it wrote PWNED) and scored the new buffer; its record pins the file's hash."""
    assert (root / "PWNED").is_file() and (root / "C" / "shard-000000.tar").is_file()
    sha = hashlib.sha256((root / "evil.py").read_bytes()).hexdigest()
    record = yaml.safe_load((root / "C" / "run.yaml").read_text())["config"]["collect"]
    assert record["reward_plugins"] == {"evil": f"{root / 'evil.py'}:make#sha256={sha}"}, record


def started_afresh(root: Path, before: dict, now: dict) -> None:
    record = yaml.safe_load((root / "B" / "run.yaml").read_text())["config"]["collect"]
    assert record["seed"] == 1 and sorted(p.name for p in (root / "B").glob("shard-*")) == ["shard-000000.tar"]
    assert json.loads((root / "B" / "manifest" / "collection.json").read_text())["groups"] == 1


def replaced_ours(root: Path, before: dict, now: dict) -> None:
    assert (root / "s.csv").read_text().splitlines() == ['"two"', "2"]  # the new query's result
    assert now[".s.csv.streamalign.json"] != before[".s.csv.streamalign.json"]  # the marker follows the file


def kept_for_resume(root: Path, before: dict, now: dict) -> None:
    """A collection that failed after its first shard: the finished shard, its part and the record (a
    re-run resumes there); no run.yaml, lock or index of a finished collection."""
    assert sorted(k for k in now if k.startswith("C")) == [
        "C", "C/.streamalign.json", "C/manifest", "C/manifest/collection.json",
        "C/manifest/shard-000000.tar.parquet", "C/shard-000000.tar"]  # fmt: skip


def train_kept_for_resume(root: Path, before: dict, now: dict) -> None:
    """A training run that failed after its first checkpoint: what --resume uses, nothing unfinished."""
    t = root / "T"
    assert [p.name for p in (t / "checkpoints").iterdir()] == ["step-0000001"]  # iteration 1 (one update)
    assert [json.loads(x)["step"] for x in (t / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (t / "run.yaml").is_file() and not (t / "adapter").exists() and not (t / "summary.json").exists()
    assert sorted(p.name for p in (t / "rollouts" / "manifest").glob("*collection.json")) == [
        "it00000-collection.json"]  # the failed iteration left no record  # fmt: skip


def empty_folder_kept(root: Path, before: dict, now: dict) -> None:
    assert now == before and not any((root / "C").iterdir())


def plugin_collect(shared: dict, prompts: str, out: Path, *extra: str) -> list[str]:
    return ["collect", "--out", str(out), "-G", "2", "--entries-per-shard", "1", "--prompts", str(shared[prompts]),
            "--rewards", "fail=1", "--metrics", "", "--reward-plugin", f"fail={shared['failing']}:make",
            "--threads", "1", *extra]  # fmt: skip


def extended_buffer(root: Path, shared: dict) -> None:
    r, _ = invoke(plugin_collect(shared, "prompts", root / "C", "--groups", "1"))
    assert r.exit_code == 0, r.output


NAMES_PLUGIN = ("names the reward plug-in 'evil'", "never imported unless you name it", "--trust-plugins")

# fmt: off
CASES: dict[str, Case] = {
    # 1. code never runs from a data folder
    "train semi --eval-every takes a recorded plug-in from --buffer": Case(
        recorded, lambda r, s, b: [*SEMI_EVAL, "--buffer", str(b), "--out", str(r / "T")],
        expect=("run.yaml names the reward plug-in 'evil' (", "evil.py:make)", *NAMES_PLUGIN[1:]),
        before_model=True),
    "train --rewards-from BUFFER": Case(
        recorded, lambda r, s, b: [*ON, "--rewards-from", str(b), "--out", str(r / "T")], expect=NAMES_PLUGIN,
        before_model=True),
    "evaluate --rewards-from BUFFER": Case(
        recorded, lambda r, s, b: ["evaluate", "--rewards-from", str(b), "--out", str(r / "E")], expect=NAMES_PLUGIN,
        before_model=True),
    "collect --rewards-from BUFFER": Case(
        recorded, lambda r, s, b: ["collect", "--rewards-from", str(b), "--out", str(r / "C")], expect=NAMES_PLUGIN,
        before_model=True),
    "a recorded module:factory plug-in (os:system)": Case(
        lambda r, s: recorded(r, s, "os:system@touch PWNED"),
        lambda r, s, b: [*ON, "--rewards-from", str(b), "--out", str(r / "T")],
        expect=("names the reward plug-in 'evil' (os:system@", "--reward-plugin evil=os:system@"), before_model=True),
    "a recorded file plug-in changed since (--trust-plugins)": Case(
        changed_plugin, lambda r, s, b: [*SEMI_EVAL, "--buffer", str(b), "--trust-plugins", "--out", str(r / "T")],
        expect=("--reward-plugin evil: ", "evil.py has changed since it was recorded", "name it again"),
        before_model=True),
    "--trust-plugins imports the recorded plug-in": Case(
        recorded, lambda r, s, b: ["collect", "--rewards-from", str(b), "--trust-plugins", "--groups", "1", "-G", "2",
                                   "--threads", "1", "--out", str(r / "C")],
        code=0, after=scored_with_plugin),
    # 3. no file replaced unasked, no lock bypassed
    "stats --output replaces a user's file": Case(
        lambda r, s: (buffer_copy(r, s), (r / "mine.txt").write_text("keep")),
        lambda r, s, x: ["stats", str(x[0]), "--sql", "SELECT 1", "--output", str(r / "mine.txt")],
        expect=("--output", "mine.txt exists and no streamalign command wrote it", "never replaced")),
    "stats --output --overwrite replaces a user's file": Case(
        lambda r, s: (buffer_copy(r, s), (r / "mine.txt").write_text("keep")),
        lambda r, s, x: ["stats", str(x[0]), "--sql", "SELECT 1", "--output", str(r / "mine.txt"), "--overwrite"],
        expect=("mine.txt exists and no streamalign command wrote it", "even with --overwrite")),
    "stats --format parquet --output replaces a user's file": Case(
        lambda r, s: (buffer_copy(r, s), (r / "mine.parquet").write_text("keep")),
        lambda r, s, x: ["stats", str(x[0]), "--sql", "SELECT 1", "--format", "parquet",
                         "--output", str(r / "mine.parquet")],
        expect=("mine.parquet exists and no streamalign command wrote it",)),
    "stats --output over its own earlier output, no --overwrite": Case(
        ours, lambda r, s, b: ["stats", str(b), "--sql", "SELECT 2 AS two", "--format", "csv",
                               "--output", str(r / "s.csv")],
        expect=("s.csv holds the output of `streamalign stats`", "--overwrite")),
    "stats --output --overwrite over its own earlier output": Case(
        ours, lambda r, s, b: ["stats", str(b), "--sql", "SELECT 2 AS two", "--format", "csv",
                               "--output", str(r / "s.csv"), "--overwrite"],
        code=0, after=replaced_ours),
    "stats --output --overwrite over its output edited by hand": Case(
        lambda r, s: ours(r, s, edit=True),
        lambda r, s, b: ["stats", str(b), "--sql", "SELECT 2 AS two", "--format", "csv",
                         "--output", str(r / "s.csv"), "--overwrite"],
        expect=("s.csv exists and no streamalign command wrote it (or it was edited since)",)),
    "model convert over a user's file": Case(
        lambda r, s: (r / "mine.safetensors").write_text("keep"),
        lambda r, s, x: ["model", "convert", SHAPES, str(r / "mine.safetensors"), "-c", "shapes"],
        expect=("OUTPUT", "mine.safetensors exists and no streamalign command wrote it"), before_model=True),
    "report into a folder no streamalign command wrote": Case(
        lambda r, s: (r / "run").mkdir() or (r / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.1}\n'),
        lambda r, s, x: ["report", str(r / "run")], expect=("holds files that no streamalign command wrote",)),
    "collect --overwrite while a live collect holds the buffer": Case(
        buffer_copy, lambda r, s, b: ["collect", "--out", str(b), "--overwrite", "--groups", "1", "-G", "2"],
        expect=("is being written by another collect (PID", "wait for it to finish"), before_model=True,
        during=lambda r, b: locked(b)),
    "collect --overwrite --seed 1 on a seed-0 buffer starts afresh": Case(
        buffer_copy, lambda r, s, b: ["collect", "--out", str(b), "--overwrite", "--seed", "1", "--groups", "1",
                                      "-G", "2", "--threads", "1"],
        code=0, after=started_afresh),
    # 4. what a failed run leaves
    "collect failing before its first shard, new folder": Case(
        nothing, lambda r, s, x: plugin_collect(s, "gray", r / "C", "--groups", "1"),
        expect=("plug-in refuses call 1",)),
    "collect failing before its first shard, empty folder": Case(
        lambda r, s: (r / "C").mkdir(), lambda r, s, x: plugin_collect(s, "gray", r / "C", "--groups", "1"),
        expect=("plug-in refuses call 1",), after=empty_folder_kept),
    "collect failing after its first shard": Case(
        nothing, lambda r, s, x: plugin_collect(s, "prompts", r / "C", "--groups", "2"),
        expect=("plug-in refuses call 2",), after=kept_for_resume),
    "collect extending a buffer, failing before the new shard": Case(
        extended_buffer, lambda r, s, x: plugin_collect(s, "prompts", r / "C", "--groups", "2"),
        expect=("plug-in refuses call",)),  # the record is as before: --groups 1 is not refused later
    "train failing before its first checkpoint": Case(
        nothing, lambda r, s, x: [*ON, "--prompts", str(s["gray"]), "--rewards", "fail=1", "--metrics", "",
                                  "--reward-plugin", f"fail={s['failing']}:make", "--out", str(r / "T")],
        expect=("plug-in refuses call 1",)),
    "train failing after its first checkpoint": Case(
        nothing, lambda r, s, x: [*ON, "--steps", "2", "--updates-per-iter", "1", "--save-every", "1",
                                  "--prompts", str(s["prompts"]),
                                  "--rewards", "fail=1", "--metrics", "", "--reward-plugin",
                                  f"fail={s['failing']}:make", "--reward-option", "fail.fail_at=2",
                                  "--out", str(r / "T")],
        expect=("plug-in refuses call 2",), after=train_kept_for_resume),
    # 5. one line, not a traceback or a late failure
    "invalid YAML in --config (train)": Case(
        lambda r, s: (r / "bad.yaml").write_text("name: x\narch: {dim: 1\n"),
        lambda r, s, x: [*ON, "-c", str(r / "bad.yaml"), "--out", str(r / "T")],
        expect=("model config", "bad.yaml:3 is not valid YAML"), before_model=True),
    "invalid YAML in --config (model info)": Case(
        lambda r, s: (r / "bad.yaml").write_text("name: x\narch: {dim: 1\n"),
        lambda r, s, x: ["model", "info", "-c", str(r / "bad.yaml")],
        expect=("bad.yaml:3 is not valid YAML",), before_model=True),
    # (the buffer's integrity record, docs/buffer-integrity.md, names the part first; verify lists it)
    **{f"a manifest column of the wrong type ({name})": Case(
        retyped, cmd, code=code,
        expect=(f"{where}manifest/shard-000001.tar.parquet: column seed is string, recorded int64",))
       for name, code, where, cmd in (
           ("buffer verify", 1, "DAMAGED shard-000001.tar: ", lambda r, s, b: ["buffer", "verify", "--deep", str(b)]),
           ("buffer info", 2, "buffer {B}: ", lambda r, s, b: ["buffer", "info", str(b)]),
           ("stats", 2, "buffer {B}: ", lambda r, s, b: ["stats", str(b), "--report", "per-prompt"]),
           ("train", 2, "buffer {B}: ", lambda r, s, b: ["train", "--buffer", str(b), "--steps", "1", *TINY,
                                                        "--out", str(r / "T")]))},
    **{f"a garbage manifest part ({name})": Case(
        garbage, cmd, code=code, expect=(f"{where}manifest/shard-000001.tar.parquet: not a readable parquet file",))
       for name, code, where, cmd in (
           ("buffer verify", 1, "DAMAGED shard-000001.tar: ", lambda r, s, b: ["buffer", "verify", str(b)]),
           ("buffer info", 2, "buffer {B}: ", lambda r, s, b: ["buffer", "info", str(b)]),
           ("stats", 2, "buffer {B}: ", lambda r, s, b: ["stats", str(b), "--sql", "SELECT 1"]),
           ("train", 2, "buffer {B}: ", lambda r, s, b: ["train", "--buffer", str(b), "--steps", "1", *TINY,
                                                        "--out", str(r / "T")]))},
    "--clip-eps without --objective (the default objective's flag)": Case(
        nothing, lambda r, s, x: [*ON, "--clip-eps", "0.3", "--batch-groups", "0", "--out", str(r / "T")],
        expect=("--batch-groups",), before_model=True),  # past the objective: the next setting's error
    "another objective's flag without --objective": Case(
        nothing, lambda r, s, x: [*ON, "--kl-w", "1e-3", "--out", str(r / "T")],
        expect=("--kl-w is a setting of --objective nft, not of the default copo: add --objective nft",),
        before_model=True),
    "--scales nan,1": Case(
        nothing, lambda r, s, x: ["merge", "--on", "a", "--scales", "nan,1", "--out", str(r / "M")],
        expect=("(--scales): Input should be a finite number",), before_model=True),
    "--s-semi inf": Case(
        nothing, lambda r, s, x: ["merge", "--on", "a", "--s-semi", "inf", "--out", str(r / "M")],
        expect=("(--s-semi): Input should be a finite number",), before_model=True),
    "--tau nan": Case(
        nothing, lambda r, s, x: [*ON, "--tau", "nan", "--out", str(r / "T")],
        expect=("(--tau): Input should be a finite number",), before_model=True),
    "--frames 100000000": Case(
        nothing, lambda r, s, x: ["generate", PROMPT, "--frames", "100000000", "--out", str(r / "G")],
        expect=("--frames 100000000: one video would hold", "GiB in memory", "give --frames"), before_model=True),
    "NaN adapter weights": Case(
        lambda r, s: nan_adapter(r), lambda r, s, a: ["generate", PROMPT, "--lora", str(a), "--out", str(r / "G")],
        expect=("adapter {root}/nan-adapter/adapter_model.safetensors: tensor", "holds NaN or infinite values")),
}
# fmt: on


@pytest.fixture
def forbid_models(monkeypatch):
    def built(*args, **kwargs):
        raise AssertionError("a model was built before the input check")

    monkeypatch.setattr(wan.CausalWanModel, "__init__", built)


@pytest.mark.parametrize("name", list(CASES))
def test_case(name, tmp_path, shared, monkeypatch, request):
    case = CASES[name]
    monkeypatch.setenv("TQDM_DISABLE", "1")
    _LOADED.clear()  # every case loads its own plug-ins (their call counters start at 0)
    x = case.setup(tmp_path, shared)
    if case.before_model:
        request.getfixturevalue("forbid_models")
    with case.during(tmp_path, x) if case.during else contextlib.nullcontext():
        before = listing(tmp_path)
        r, lines = invoke(case.args(tmp_path, shared, x))
        now = listing(tmp_path)
    assert r.exit_code == case.code, (r.exit_code, r.output, r.exception)
    if case.code == 2:
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert "Traceback" not in r.output and "<Buffer>" not in lines[0], lines[0]
        for e in case.expect:
            assert e.format(B=tmp_path / "B", root=tmp_path) in lines[0], lines[0]
    if case.code == 1:  # a report of problems (buffer verify): its first line names the problem
        first = r.stdout.splitlines()[0]
        assert "Traceback" not in r.output and all(e.format(B=tmp_path / "B") in first for e in case.expect), first
    (case.after or (lambda root, b, n: None if n == b else pytest.fail(f"files changed: {sorted(set(n) ^ set(b))}")))(
        tmp_path, before, now)
    assert not (tmp_path / "PWNED").exists() or case.after is scored_with_plugin


def test_a_plugin_named_again_is_imported(tmp_path, shared):
    """The user naming the recorded plug-in (same file) is what allows it: the record's is never needed."""
    b = recorded(tmp_path, shared)
    cfg = TrainConfig(buffer=str(b), eval_every=1, reward_plugins=f"evil={tmp_path / 'evil.py'}:make").resolve()
    assert cfg.rollouts.rewards.endswith(",evil=1") and not (tmp_path / "PWNED").exists()
    reward_of(cfg.rollouts)  # checked (imported) as before any model loads
    assert (tmp_path / "PWNED").is_file()


def test_the_default_objectives_flags_need_no_objective():
    cfg = TrainConfig.build(None, mode="on", clip_eps=0.3, tau=0.5)
    assert cfg.objective.name == "copo" and cfg.objective.clip_eps == 0.3 and cfg.objective.tau == 0.5
    assert TrainConfig.build(None, mode="on", objective="nft", kl_w=1e-3).objective.kl_w == 1e-3


def test_overwrite_takes_the_lock_before_it_moves_anything(tmp_path, shared):
    """Past the early check (a writer that arrived just after it): the folder swap itself is refused while
    a live process holds the lock, and the buffer is untouched."""
    b = buffer_copy(tmp_path, shared)
    with BufferLock(b):
        before = listing(tmp_path)
        with permit_overwrite(b), pytest.raises(BufferBusyError, match=f"PID {os.getpid()}"), locked_output(b):
            pass
        assert listing(tmp_path) == before
    with permit_overwrite(b), locked_output(b):  # free now: replaced by a fresh folder, locked from the start
        assert sorted(p.name for p in b.iterdir()) == [".streamalign.json", "collect.lock"]
        with pytest.raises(BufferBusyError):
            BufferLock(b).__enter__()
    assert sorted(p.name for p in b.iterdir()) == [".streamalign.json"]


def test_nan_settings_in_a_run_file_are_one_line(tmp_path):
    (tmp_path / "run.yaml").write_text("mode: 'on'\nobjective: {name: copo, tau: .nan}\n")
    with pytest.raises(ValueError, match=r"objective.*tau.*finite number"):
        TrainConfig.build(tmp_path / "run.yaml")
