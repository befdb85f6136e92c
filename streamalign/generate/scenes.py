"""Multi-scene prompt syntax: ``prompt one[5s] | prompt two[10s#] | prompt three``.

Scenes are separated by ``|``. A scene may end with ``[<seconds>s]``, its duration, or ``[<seconds>s#]``:
the same, and the scene starts with a HARD CUT (the KV cache is flushed and frame positions restart, so
it does not depend on anything before it). Without ``#`` the change is a soft transition (KV kept, the
cross-attention switched to the new prompt). A scene without a duration lasts the model's training
length, or, when a total length is given, the scenes without one share what remains.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_SCENE = re.compile(r"^(?P<text>[^\[\]]*?)\s*(?:\[(?P<sec>\d+(?:\.\d+)?|\.\d+)s(?P<cut>#?)\])?$")


class SceneSyntaxError(ValueError):
    pass


@dataclass(frozen=True)
class Scene:
    prompt: str
    seconds: float | None = None
    hard_cut: bool = False


def parse_scenes(spec: str) -> list[Scene]:
    """Parse the scene syntax; one clear error naming the offending scene otherwise."""
    scenes = []
    for i, part in enumerate(spec.split("|"), 1):
        text = part.strip()
        m = _SCENE.match(text)
        if m is None:
            raise SceneSyntaxError(
                f"scene {i} {text!r}: a duration must close the scene as [<seconds>s] or [<seconds>s#], "
                "and '[' / ']' may not appear elsewhere"
            )
        if not m["text"].strip():
            raise SceneSyntaxError(f"scene {i} {text!r} has no prompt (two '|' in a row, or a leading/trailing '|')")
        sec = float(m["sec"]) if m["sec"] is not None else None
        if sec is not None and sec <= 0:
            raise SceneSyntaxError(f"scene {i} {text!r}: the duration must be > 0 seconds")
        if m["cut"] and i == 1:
            raise SceneSyntaxError(
                f"scene 1 {text!r}: '#' marks a hard cut INTO a scene; the first has nothing before it"
            )
        scenes.append(Scene(m["text"].strip(), sec, bool(m["cut"])))
    return scenes


def scene_chunks(
    scenes: list[Scene], chunk_seconds: float, default_chunks: int, total_chunks: int | None = None
) -> list[int]:
    """Chunks per scene: durations rounded to whole chunks (at least 1); scenes without one get
    `default_chunks`, or an equal share of what `total_chunks` leaves (at least 1 each)."""
    fixed = [max(1, round(s.seconds / chunk_seconds)) if s.seconds is not None else None for s in scenes]
    free = [i for i, n in enumerate(fixed) if n is None]
    if total_chunks is None:
        return [n if n is not None else default_chunks for n in fixed]
    left = total_chunks - sum(n for n in fixed if n is not None)
    if free and left < len(free):
        raise SceneSyntaxError(
            f"the scene durations already fill {total_chunks - left} of the {total_chunks} chunks asked for: "
            "raise --frames or shorten the scenes"
        )
    share = [left // len(free) + (1 if k < left % len(free) else 0) for k in range(len(free))] if free else []
    for i, n in zip(free, share, strict=True):
        fixed[i] = n
    return [int(n) for n in fixed]


def chunk_seconds(chunk_frames: int, temporal: int, fps: float) -> float:
    """Seconds of video one chunk makes: latent frames x the codec's temporal factor / fps."""
    if fps <= 0 or not math.isfinite(fps):
        raise ValueError(f"--fps {fps} must be a positive number")
    return chunk_frames * temporal / fps
