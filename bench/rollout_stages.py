"""Section 1 of bench/bench_rollout.py: our rollout at each speed-up's commit vs the reference pipeline.

Each variant runs in its own worker process (this file with ``--worker``), which builds the three configs
with the same weights, text and noise and answers one JSON request per line on stdin: a timed batch-1
rollout (seconds, minor page faults), the FLOPs of one rollout, or the CPU's matmul rate. The driver
alternates the variants (each round in a rotated order) and keeps each one's best time.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = {
    "small": dict(
        arch=dict(dim=128, ffn_dim=512, num_heads=4, num_layers=2, text_len=32, text_dim=384, freq_dim=64),
        latent=dict(height=16, width=16, frames=12),
    ),
    "rolling": dict(
        arch=dict(dim=128, ffn_dim=512, num_heads=4, num_layers=2, text_len=32, text_dim=384, freq_dim=64),
        latent=dict(height=16, width=16, frames=24),
        cache=dict(sink=3, window=6),
    ),
    "medium": dict(
        arch=dict(dim=512, ffn_dim=2048, num_heads=8, num_layers=4, text_len=32, text_dim=384, freq_dim=128),
        latent=dict(height=20, width=32, frames=12),
    ),
}

# (label, commit): the code before issue 29 and after each of its items; "" is this working tree
STAGES = (
    ("before", "923c04c"),
    ("+1 kept KV storage, host heap", "2274f89"),
    ("+2 no unread refresh, K/V-only refresh", "b904da0"),
    ("+3 RoPE table, complex multiply", "ffac110"),
    ("+4 GPU-path copies (this tree)", ""),
)


# -- worker ----------------------------------------------------------------------------------------------
def _build(name: str):
    from streamalign.models.sampler import Sampler
    from streamalign.models.wan import CausalWanModel
    from streamalign.schemas.config import ModelConfig

    cfg = ModelConfig.model_validate(dict(name=name, **CONFIGS[name]))
    torch.manual_seed(0)
    model = CausalWanModel(cfg.arch).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.head.head.weight, std=0.02)  # Wan zero-inits the head
    sampler = Sampler(model, cfg)
    text = torch.randn(1, 16, cfg.arch.text_dim, generator=torch.Generator().manual_seed(1))
    return cfg, sampler, text


def _matmul_gflops(tokens: int = 480, dim: int = 512, ffn: int = 2048, repeats: int = 20) -> float:
    """The best rate of the medium config's FFN matmul ([tokens, dim] x [dim, ffn], float32)."""
    a, b = torch.randn(tokens, dim), torch.randn(dim, ffn)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * tokens * dim * ffn / best / 1e9


def worker(reference: str | None, deps: str | None, out_dir: str) -> None:
    """Answer requests until stdin closes (see the module docstring)."""
    if deps:
        sys.path.insert(0, deps)
    built, runners = {}, {}
    for line in sys.stdin:
        req = json.loads(line)
        name = req.get("config")
        if name is not None and name not in built:
            built[name] = _cfg, sampler, text = _build(name)
            if reference:
                sys.path.insert(0, str(Path(__file__).parent))
                from reference_selfforcing import ReferencePipeline

                pipe = ReferencePipeline(reference, sampler)
                runners[name] = lambda p=pipe, s=sampler, t=text: p.rollout(t, s.noise_bank([0]))
            else:
                runners[name] = lambda s=sampler, t=text: s.rollout(t, s.noise_bank([0]))
        if req["op"] == "run":
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            latents = runners[name]()
            seconds = time.perf_counter() - t0
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            path = Path(out_dir) / f"{name}.pt"
            torch.save(latents.contiguous(), path)
            reply = dict(seconds=seconds, faults=faults, latents=str(path))
        elif req["op"] == "flops":
            from streamalign.models.memory import measure

            _, report = measure(runners[name], flops=True)
            reply = dict(flops=int(report.flops))
        elif req["op"] == "matmul":
            reply = dict(gflops=_matmul_gflops())
        else:
            raise SystemExit(f"unknown request {req}")
        print(json.dumps(reply), flush=True)


def stage_tables(results: dict) -> dict[str, dict]:
    """The results tables of :func:`run_stages`'s numbers: one per config (``stages_<config>``) and the
    FLOP bound of each config's last stage (``stages_bound``)."""
    from streamalign.io.results import table

    out = {}
    for name, r in results["configs"].items():
        out[f"stages_{name}"] = table(
            ["variant", "s / video", "vs stage before", "vs before", "reference / ours", "page faults / video",
             "max abs diff vs before"],
            ["{}", "{:.3f}", "{:.2f}x", "{:.2f}x", "{:.2f}x", "{}", "{:.1e}"],
            [[label, v["seconds"], v["vs_prev"], v["vs_before"], v["ref_over_ours"], v["faults"], v["max_abs_diff"]]
             for label, v in r["variants"].items()],
        )  # fmt: skip
    out["stages_bound"] = table(
        ["config", "latent frames", "GFLOP / video", "matmul GFLOP/s", "frames/s", "frames/s the FLOPs allow",
         "achieved"],
        ["{}", "{}", "{:.2f}", "{:.1f}", "{:.2f}", "{:.2f}", "{:.0%}"],
        [[name, r["frames"], r["flops"] / 1e9, results["matmul_gflops"], r["frames_per_s"],
          r["flop_bound_frames_per_s"], r["frames_per_s"] / r["flop_bound_frames_per_s"]]
         for name, r in results["configs"].items()],
    )  # fmt: skip
    return out


# -- driver ----------------------------------------------------------------------------------------------
class Variant:
    """One worker process: our code at a commit (or this tree), or the reference pipeline."""

    def __init__(self, label: str, src: Path, tmp: Path, reference: str | None = None, deps: str | None = None):
        self.label = label
        out = tmp / label.replace(" ", "_").replace("/", "_").replace(",", "")
        out.mkdir()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--out", str(out)]
        if reference:
            cmd += ["--reference", reference] + (["--reference-deps", deps] if deps else [])
        env = {**os.environ, "PYTHONPATH": str(src)}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"error: the {self.label!r} worker stopped (see its output above)")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def export_tree(rev: str, dest: Path) -> Path:
    """``streamalign/`` of commit `rev` unpacked under `dest` (the working tree's for rev "")."""
    if not rev:
        return ROOT
    archive = dest / f"{rev}.tar"
    try:
        subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), rev, "streamalign"], check=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        raise SystemExit(f"error: cannot export commit {rev} (run the bench in a git checkout that has it)") from None
    tree = dest / rev
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


def run_stages(
    reference: str | None, deps: str | None, repeats: int, stages=STAGES, configs: tuple[str, ...] = tuple(CONFIGS)
) -> dict:
    """Time every variant on `configs`; print the table and return the numbers."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        variants = [Variant(label, export_tree(rev, tmp), tmp) for label, rev in stages]
        if reference:
            variants.append(Variant("reference", ROOT, tmp, reference, deps))
        try:
            return _measure(variants, repeats, configs)
        finally:
            for v in variants:
                v.close()


def _measure(variants: list[Variant], repeats: int, configs: tuple[str, ...]) -> dict:
    ours = [v for v in variants if v.label != "reference"]
    ref = next((v for v in variants if v.label == "reference"), None)
    rate = max(ours[-1].ask(op="matmul")["gflops"] for _ in range(3))
    results: dict = {"matmul_gflops": rate, "repeats": repeats, "threads": torch.get_num_threads(), "configs": {}}
    print(f"\n== ours at each stage vs the reference pipeline (CPU, best of {repeats} alternated runs) ==")
    print(f"matmul rate: {rate:.1f} GFLOP/s ([480x512] x [512x2048] float32, best of 60)")
    for name in configs:
        frames = CONFIGS[name]["latent"]["frames"]
        for v in variants:  # warm-up: builds the config and runs it once
            v.ask(op="run", config=name)
        best = {v.label: dict(seconds=float("inf")) for v in variants}
        for r in range(repeats):
            for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
                got = v.ask(op="run", config=name)
                if got["seconds"] < best[v.label]["seconds"]:
                    best[v.label] = got
        flops = ours[-1].ask(op="flops", config=name)["flops"]
        first = torch.load(best[ours[0].label]["latents"], weights_only=True)
        rows = {}
        print(f"\n{name}: {frames} latent frames, {flops / 1e9:.2f} GFLOP per video (last stage)")
        print(
            "variant                                   s/video  vs prev  vs before  ref/ours  faults/video  max|diff|"
        )
        prev = None
        for v in variants:
            b = best[v.label]
            diff = (torch.load(b["latents"], weights_only=True) - first).abs().max().item()
            row = dict(seconds=b["seconds"], faults=b["faults"], max_abs_diff=diff)
            row["vs_before"] = best[ours[0].label]["seconds"] / b["seconds"]
            row["vs_prev"] = best[prev.label]["seconds"] / b["seconds"] if prev is not None and v is not ref else None
            row["ref_over_ours"] = best[ref.label]["seconds"] / b["seconds"] if ref is not None else None
            rows[v.label] = row

            def fmt(x, spec):
                return format(x, spec) if x is not None else "-"

            print(
                f"{v.label:40s} {b['seconds']:8.3f}  {fmt(row['vs_prev'], '6.2f')}x  {row['vs_before']:8.2f}x"
                f"  {fmt(row['ref_over_ours'], '7.2f')}x  {b['faults']:12d}  {diff:9.1e}"
            )
            prev = v if v is not ref else prev
        last = rows[ours[-1].label]
        bound = rate * 1e9 / (flops / frames)
        achieved = frames / last["seconds"]
        print(
            f"frames/s: {achieved:.2f} achieved, {bound:.2f} allowed by the FLOP count at {rate:.1f} GFLOP/s "
            f"({achieved / bound:.0%} of it)"
        )
        results["configs"][name] = dict(
            frames=frames, flops=flops, frames_per_s=achieved, flop_bound_frames_per_s=bound, variants=rows
        )
    return results


if __name__ == "__main__" and "--worker" in sys.argv:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--out", required=True)
    ap.add_argument("--reference")
    ap.add_argument("--reference-deps")
    a = ap.parse_args()
    worker(a.reference, a.reference_deps, a.out)
