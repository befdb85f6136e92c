"""Replay-buffer storage backends, manifest, streaming reader, verify and stats (issue 4)."""
