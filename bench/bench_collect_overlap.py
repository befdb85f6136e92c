"""Background scoring in collect: groups/s with and without ``--background-scoring`` on a deliberately slow
reward (a plug-in that sleeps `--sleep` seconds per group, registered as ``--reward-plugin`` registers it),
and their ratio, measured in one run on the shapes world.

    python bench/bench_collect_overlap.py [--groups 8] [-G 12] [--sleep auto] [--threads 1] [--repeats 2]
        [--json-out results/bench_collect_overlap.json]

``--sleep auto`` sleeps as long as one group's roll-out takes (measured first): the case where overlapping
gains the most (ideal ratio 2n / (n + 1) for n groups: 1.78 for 8). The sleep stands for a reward model
that does not use this process's CPU (another GPU, a remote scorer); a reward that computes on the same
cores competes with the roll-out for them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from results_file import add_json_out, save

from streamalign.collect.collector import CollectConfig, collect, roll_out_group
from streamalign.io.results import table
from streamalign.pipeline import Pipeline
from streamalign.worlds.shapes import held_in_prompts

PLUGIN = """
import time

def make(sleep=0.0):
    def score(videos, prompts):  # mean brightness after `sleep` seconds: [B]
        time.sleep(float(sleep))
        return videos.float().mean(dim=(1, 2, 3, 4))
    return score
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("-G", "--group-size", type=int, default=12)
    ap.add_argument("--sleep", default="auto", help="Seconds the reward sleeps per group, or auto.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="Runs of each mode, alternating; the best is printed.")
    add_json_out(ap, "bench_collect_overlap")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    policy = Pipeline.load("shapes")
    prompts = tuple(p.text for p in held_in_prompts()[::20])
    with tempfile.TemporaryDirectory() as tmp:
        plugin = Path(tmp) / "slow_reward.py"
        plugin.write_text(PLUGIN)
        base = CollectConfig(prompts=prompts, groups=args.groups, group_size=args.group_size, entries_per_shard=4,
                             rewards="slow=1", metrics="", reward_plugins=f"slow={plugin}:make")  # fmt: skip
        roll_out_group(policy, base, 0)  # warm-up
        t = time.perf_counter()
        roll_out_group(policy, base, 1)
        rollout = time.perf_counter() - t
        sleep = rollout if args.sleep == "auto" else float(args.sleep)
        base = base.model_copy(update={"reward_options": {"slow.sleep": f"{sleep:.4f}"}})
        print(f"shapes world, {args.groups} groups of G={args.group_size}, {args.threads} torch thread(s); "
              f"one roll-out {rollout:.3f} s, reward sleeps {sleep:.3f} s per group")  # fmt: skip
        rates: dict[bool, float] = {False: 0.0, True: 0.0}
        for r in range(args.repeats):  # alternating, best of each: other load on the machine hits both alike
            for background in (False, True):
                cfg = base.model_copy(update={"background_scoring": background})
                s = collect(policy, cfg, Path(tmp) / f"buffer-{r}-{background}", progress=False)
                rates[background] = max(rates[background], s.groups / s.seconds)
        for background in (False, True):
            print(f"{'background' if background else 'synchronous':12s} {rates[background]:7.2f} groups/s")
        n = args.groups  # overlapped: the first roll-out, n - 1 times the longer of the two, the last scoring
        ideal = n * (rollout + sleep) / (rollout + (n - 1) * max(rollout, sleep) + sleep)
        print(f"ratio background / synchronous: {rates[True] / rates[False]:.2f} (ideal {ideal:.2f})")
    row = [args.groups, args.group_size, rates[False], rates[True], rates[True] / rates[False], ideal]
    save(args, {"overlap": table(["groups", "G", "synchronous groups/s", "`--background-scoring` groups/s", "ratio",
                                  "ideal ratio"], ["{}", "{}", "{:.2f}", "{:.2f}", "{:.2f}", "{:.2f}"], [row])},
         data={"rollout_s": rollout, "sleep_s": sleep, "repeats": args.repeats})  # fmt: skip


if __name__ == "__main__":
    main()
