"""The plan of a wan-14b collect / evaluate / train on one H100 with VideoAlign (Qwen2-VL-2B), then VideoAlign
and HPSv3 (Qwen2-VL-7B), as the reward models, from config-only folders (no weights): what it holds, how the
branch batches change, and what ``--reward-offload`` decides. Writes ``results/plan-rewards.json``.

The VideoAlign folder holds KlingTeam/VideoReward's ``model_config.json`` fields the planner reads (fps 2.0,
max_frame_pixels 200704, LoRA r 64 on the language model, 3 reward tokens, output_dim 1) and the
Qwen2-VL-2B-Instruct ``config.json``; the HPSv3 folder the Qwen2-VL-7B-Instruct ``config.json`` (published
architecture numbers, written here; no tokenizer, so the embeddings are the config's 152064 rows, 406 more
than the released checkpoint's: 2.8 MiB). HPSv3's head and pixels are the released yaml's.

    python bench/bench_plan_rewards.py [--stages collect[,evaluate,train]] [--out results/plan-rewards.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from streamalign.models.memory import GiB
from streamalign.plan import PlanRun, plan
from streamalign.rewards import plan as _planners  # noqa: F401  (registers the reward planners)

# Qwen2-VL-2B-Instruct's config.json (architecture fields)
QWEN2_VL_2B = {
    "model_type": "qwen2_vl",
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
    "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": True, "hidden_act": "silu",
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "bos_token_id": 151643, "eos_token_id": 151645,
}  # fmt: skip
# Qwen2-VL-7B-Instruct's config.json (architecture fields)
QWEN2_VL_7B = {
    **QWEN2_VL_2B,
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
    "vision_config": {**QWEN2_VL_2B["vision_config"], "hidden_size": 3584},
}  # fmt: skip
VIDEOREWARD_CONFIG = {
    "data_config": {"fps": 2.0, "max_frame_pixels": 200704, "eval_dim": ["VQ", "MQ", "TA"],
                    "prompt_template_type": "detailed_special"},
    "model_config": {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "output_dim": 1, "reward_token": "special"},
    "peft_lora_config": {"lora_enable": True, "lora_r": 64, "lora_alpha": 128},
}  # fmt: skip


def config_folder(root: Path) -> Path:
    """A config-only VideoAlign folder (Qwen2-VL-2B)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(QWEN2_VL_2B))
    (root / "model_config.json").write_text(json.dumps(VIDEOREWARD_CONFIG))
    return root


def hpsv3_folder(root: Path) -> Path:
    """A config-only HPSv3 folder (Qwen2-VL-7B's config.json)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(QWEN2_VL_7B))
    return root


SETUPS = ("no reward model", "videoalign, auto", "videoalign, keep", "videoalign + hpsv3, auto",
          "videoalign + hpsv3, cpu")  # fmt: skip


def collect_table(res: dict) -> dict:
    """The collect stage of every setup: reward weights, branch batches, the last fork's and the scoring
    phases' peaks, the stage's peak and whether it fits, what --reward-offload decided."""
    from streamalign.io.results import table

    rows = []
    for label in SETUPS:
        w, c = res[label]["weights_gib"], res[label]["stages"]["collect"]
        fork = next(v for k, v in c["phases"].items() if k.startswith("fork group p=6"))
        scoring = [v for k, v in c["phases"].items() if k.startswith("score")]
        kept = c["rewards_kept"]
        rows.append([label, sum(v for k, v in w.items() if k.startswith("reward:")) or None,
                     [c["batches"]["branch_batch"]["0"], c["batches"]["branch_batch"]["6"]], fork,
                     max(scoring) if scoring else None, c["peak_gib"], "yes" if c["fits"] else "no",
                     None if kept is None else "kept" if kept else "offloaded"])  # fmt: skip
    return table(["collect", "reward weights (GiB)", "branch batch p=0 / p=6", "fork p=6 peak (GiB)",
                  "largest scoring peak (GiB)", "stage peak (GiB)", "fits (79.1 GiB)", "reward models"],
                 ["{}", "{:.2f}", "{} / {}", "{:.2f}", "{:.2f}", "{:.2f}", "{}", "{}"], rows)  # fmt: skip


def main() -> None:
    from results_file import add_json_out, save  # bench/ on the path when run as a script

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="collect")
    add_json_out(ap, "plan-rewards")
    args = ap.parse_args()
    stages = tuple(args.stages.split(","))
    res: dict = {"model": "wan-14b", "gpu": "h100", "reward": "videoalign (Qwen2-VL-2B + LoRA r64), bf16",
                 "hpsv3": "Qwen2-VL-7B + RankNet head (fp32), 8 frames of 336x588 per scoring batch"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = config_folder(Path(tmp) / "videoalign")
        hps = hpsv3_folder(Path(tmp) / "hpsv3")
        common = dict(config="wan-14b", gpu="h100", stages=stages)
        rewards = dict(rewards="videoalign.VQ=1,videoalign.MQ:gray=1", reward_paths={"videoalign": str(folder)})
        both = dict(rewards="videoalign.VQ=1,videoalign.MQ:gray=1,hpsv3=1",
                    reward_paths={"videoalign": str(folder), "hpsv3": str(hps)})  # fmt: skip
        kws = ({}, rewards, {**rewards, "reward_offload": "keep"}, both, {**both, "reward_offload": "cpu"})
        for label, kw in zip(SETUPS, kws, strict=True):
            p = plan(PlanRun.build(**common, **kw)).to_dict()
            res[label] = {"weights_gib": {k: round(v / GiB, 3) for k, v in p["weights"].items()},
                          "stages": {s: {"peak_gib": round(d["peak"] / GiB, 2), "fits": d["fits"],
                                         "rewards_kept": d.get("rewards_kept"),
                                         "batches": {k: {str(p): b for p, b in d[k].items()} if isinstance(d[k], dict)
                                                     else d[k] for k in ("branch_batch", "eval_batch", "replay_batch")
                                                     if k in d},
                                         "phases": {ph["name"]: round(ph["peak"] / GiB, 2) for ph in d["phases"]}}
                                     for s, d in p["stages"].items()}}  # fmt: skip
            print(label, json.dumps(res[label], indent=1))
    tables = {"collect": collect_table(res)} if "collect" in stages else {}
    save(args, tables, data=res, note="G = 12, pivot uniform (the first and last planned), bf16, config-only folders")


if __name__ == "__main__":
    main()
