"""The plan of a wan-14b collect / evaluate / train on one H100 with VideoAlign (Qwen2-VL-2B) as the reward
model, from a config-only folder (no weights): what it holds, how the branch batches change, and what
``--reward-offload`` decides. Writes ``results/plan-rewards.json``.

The folder holds KlingTeam/VideoReward's ``model_config.json`` fields the planner reads (fps 2.0,
max_frame_pixels 200704, LoRA r 64 on the language model, 3 reward tokens, output_dim 1) and the
Qwen2-VL-2B-Instruct ``config.json`` (published architecture numbers, written here).

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
VIDEOREWARD_CONFIG = {
    "data_config": {"fps": 2.0, "max_frame_pixels": 200704, "eval_dim": ["VQ", "MQ", "TA"],
                    "prompt_template_type": "detailed_special"},
    "model_config": {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "output_dim": 1, "reward_token": "special"},
    "peft_lora_config": {"lora_enable": True, "lora_r": 64, "lora_alpha": 128},
}  # fmt: skip


def config_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(QWEN2_VL_2B))
    (root / "model_config.json").write_text(json.dumps(VIDEOREWARD_CONFIG))
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="collect")
    ap.add_argument("--out", default="results/plan-rewards.json")
    args = ap.parse_args()
    stages = tuple(args.stages.split(","))
    res: dict = {"model": "wan-14b", "gpu": "h100", "reward": "videoalign (Qwen2-VL-2B + LoRA r64), bf16"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = config_folder(Path(tmp) / "videoalign")
        common = dict(config="wan-14b", gpu="h100", stages=stages)
        rewards = dict(rewards="videoalign.VQ=1,videoalign.MQ:gray=1", reward_paths={"videoalign": str(folder)})
        for label, kw in (("no reward model", {}), ("videoalign, auto", {**rewards}),
                          ("videoalign, keep", {**rewards, "reward_offload": "keep"})):  # fmt: skip
            p = plan(PlanRun.build(**common, **kw)).to_dict()
            res[label] = {"weights_gib": {k: round(v / GiB, 3) for k, v in p["weights"].items()},
                          "stages": {s: {"peak_gib": round(d["peak"] / GiB, 2), "fits": d["fits"],
                                         "rewards_kept": d.get("rewards_kept"),
                                         "batches": {k: d[k] for k in ("branch_batch", "eval_batch", "replay_batch")
                                                     if k in d},
                                         "phases": {ph["name"]: round(ph["peak"] / GiB, 2) for ph in d["phases"]}}
                                     for s, d in p["stages"].items()}}  # fmt: skip
            print(label, json.dumps(res[label], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
