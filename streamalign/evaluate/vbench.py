"""Out-of-domain evaluation with VBench: export videos the way VBench reads them, read back its results.

VBench's sampling rules (Vchitect/VBench ``prompts/README.md``): for each prompt list (one ``.txt`` per
dimension in ``prompts/prompts_per_dimension``, or ``all_dimension.txt``), sample 5 videos per prompt and
save them as ``$base/$model/$list/$prompt-$index.mp4``, index 0..4; VBench recovers the prompt from the
file name. Our export keeps that layout; the noise of video ``j`` of a list (prompt-major, then index) is
seed ``seed + j`` for every model, so models are compared on identical noise (VBench itself asks for seed 2
at the start of each list: the default ``seed``). A ``/`` in a prompt cannot be part of a file name and
is written as ``_`` (such a prompt no longer matches VBench's standard list; use ``--mode=custom_input``).

``vbench evaluate`` writes ``<name>_eval_results.json``: ``{dimension: [score, [per-video results]]}``;
:func:`read_results` reads the scores, and ``merge --ood-metric vbench:<dimension> --ood-results DIR``
takes the OOD criterion of each row (``base``, ``s0.4``, ...) from ``DIR/<row>_eval_results.json``.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path

from ..io.media import save_mp4

RESULTS_SUFFIX = "_eval_results.json"
METRIC_PREFIX = "vbench:"


def prompt_lists(source: str | Path | None, fallback: list[str]) -> dict[str, list[str]]:
    """{list name: prompts}: a ``.txt`` file (one list named after it), a folder of ``.txt`` lists (VBench's
    ``prompts_per_dimension``), or `fallback` (the evaluation prompts) as the list ``custom``."""
    if source is None:
        return {"custom": list(fallback)}
    path = Path(source)
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"--vbench-prompts {source}: no .txt prompt list there (one prompt per line)")
    lists = {}
    for f in files:
        try:
            prompts = [s.strip() for s in f.read_text(encoding="utf-8").splitlines() if s.strip()]
        except UnicodeDecodeError:
            raise ValueError(f"--vbench-prompts {f}: not UTF-8 text") from None
        if not prompts:
            raise ValueError(f"--vbench-prompts {f}: no prompts")
        lists[f.stem] = prompts
    return lists


def file_name(prompt: str, index: int) -> str:
    """VBench's ``$prompt-$index.mp4``."""
    return f"{prompt.replace('/', '_')}-{index}.mp4"


class VBenchExport:
    """Writes every model's videos into one staged export folder: ``<model>/<list>/<prompt>-<i>.mp4``,
    ``export.json`` (prompts, seeds, models) and ``vbench.sh`` (the commands that score them)."""

    def __init__(self, out: str | Path, lists: dict[str, list[str]], samples: int = 5, seed: int = 2,
                 fps: float = 16.0, batch: int = 8) -> None:  # fmt: skip
        if samples < 1:
            raise ValueError(f"--vbench-samples must be >= 1, got {samples}")
        self.out, self.lists, self.samples, self.seed = Path(out), lists, samples, seed
        self.fps, self.batch = fps, batch
        self.models: list[str] = []

    def jobs(self, name: str) -> list[tuple[str, int, Path]]:
        """(prompt, seed, relative path) of every video of one model."""
        out = []
        for list_name, prompts in self.lists.items():
            for j, (p, i) in enumerate((p, i) for p in prompts for i in range(self.samples)):
                out.append((p, self.seed + j, Path(name) / list_name / file_name(p, i)))
        return out

    def write(self, folder: Path, name: str, generate: Callable[[list[str], list[int]], object]) -> None:
        """Generate and save one model's videos into `folder` (the staged export)."""
        jobs = self.jobs(name)
        for k in range(0, len(jobs), self.batch):
            part = jobs[k : k + self.batch]
            videos = generate([p for p, _, _ in part], [s for _, s, _ in part])
            for (_, _, rel), video in zip(part, videos, strict=True):
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                save_mp4(video, folder / rel, fps=self.fps)
        self.models.append(name)

    def finish(self, folder: Path) -> None:
        record = {"layout": "<model>/<list>/<prompt>-<index>.mp4", "samples": self.samples, "seed": self.seed,
                  "seeds": "video j of a list (prompt-major, then index) uses seed + j, for every model",
                  "fps": self.fps, "models": self.models, "lists": self.lists}  # fmt: skip
        (folder / "export.json").write_text(json.dumps(record, indent=1))
        (folder / "vbench.sh").write_text(score_script(self.out, self.models, list(self.lists)))


def score_script(out: Path, models: list[str], lists: list[str]) -> str:
    """The shell commands that score an export with VBench (``pip install vbench``; run where its weights
    are): one ``vbench evaluate`` per model and list, results in ``<out>/results/<model>/``. A list named
    after a VBench dimension is scored as that dimension; other lists (``custom``) in custom-input mode."""
    lines = ["#!/usr/bin/env bash", "# Score the exported videos with VBench (github.com/Vchitect/VBench).", "set -e"]
    for m in models:
        for lst in lists:
            videos = shlex.quote(str(out / m / lst))
            results = shlex.quote(str(out / "results" / m))
            dim = lst if lst in VBENCH_DIMENSIONS else "${DIMENSIONS:-subject_consistency motion_smoothness}"
            mode = "" if lst in VBENCH_DIMENSIONS else " --mode=custom_input"
            lines.append(f"for d in {dim}; do vbench evaluate --videos_path {videos} --dimension $d"
                         f" --output_path {results}{mode}; done")  # fmt: skip
    lines.append(f"# then: streamalign merge ... --ood-metric vbench:<dimension> --ood-results {out}/results/<model>")
    return "\n".join(lines) + "\n"


VBENCH_DIMENSIONS = ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
                     "dynamic_degree", "aesthetic_quality", "imaging_quality", "object_class", "multiple_objects",
                     "human_action", "color", "spatial_relationship", "scene", "temporal_style", "appearance_style",
                     "overall_consistency")  # fmt: skip


def read_results(path: str | Path) -> dict[str, float]:
    """{dimension: score} of a VBench ``*_eval_results.json`` (each value ``[score, per-video results]``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VBench results {path} not found (run the export's vbench.sh first)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"VBench results {path} are not JSON: {e}") from None
    out = {}
    for dim, value in data.items() if isinstance(data, dict) else ():
        score = value[0] if isinstance(value, list) and value else value
        if isinstance(score, (int, float)) and not isinstance(score, bool):
            out[dim] = float(score)
    if not out:
        raise ValueError(f"VBench results {path} hold no {{dimension: [score, ...]}} entries")
    return out


def results_metric(folder: str | Path, row: str, metric: str) -> float:
    """The score of `metric` (``vbench:<dimension>``) for merge row `row` from ``folder`` (every
    ``*_eval_results.json`` under ``folder/<row>/`` or named ``<row>_eval_results.json``)."""
    dim = metric.removeprefix(METRIC_PREFIX)
    folder = Path(folder)
    files = sorted((folder / row).glob(f"*{RESULTS_SUFFIX}")) if (folder / row).is_dir() else []
    files += [f for f in [folder / f"{row}{RESULTS_SUFFIX}"] if f.is_file()]
    for f in files:
        scores = read_results(f)
        if dim in scores:
            return scores[dim]
    raise ValueError(f"--ood-results {folder}: no VBench '{dim}' score for '{row}' "
                     f"(expected {folder / row}/*{RESULTS_SUFFIX} or {folder / row}{RESULTS_SUFFIX})")  # fmt: skip
