"""Safety checks on outputs, checkpoints and adapters: stale temporaries of killed runs, checkpoint dtypes
and legacy pickles, adapter rank / module mismatches."""

from __future__ import annotations

from streamalign.io.files import atomic_path, staged_folder


def _leftovers(folder, name, dead, live):
    """Stale siblings of `name` (to be removed) and look-alikes that must survive."""
    stale = [folder / f".{name}.tmp-{dead}", folder / f".{name}.old-{dead}"]
    stale[0].mkdir()
    (stale[0] / "half.bin").write_bytes(b"x")
    stale[1].write_text("old")
    names = [f".{name}.tmp-{live}", f".other.tmp-{dead}", f".{name}.tmp-{dead}.keep", f"{name}.tmp-{dead}",
             f".{name}.tmp-x{dead}", f".{name}x.old-{dead}"]  # fmt: skip
    keep = [folder / n for n in names]
    for k in keep:
        k.write_text("keep")
    return stale, keep


def test_staged_folder_removes_stale_siblings_of_dead_processes_only(tmp_path, pids):
    dead, live = pids
    stale, keep = _leftovers(tmp_path, "run", dead, live)
    with staged_folder(tmp_path / "run") as tmp:
        (tmp / "result.json").write_text("{}")
    assert (tmp_path / "run" / "result.json").is_file()
    assert not any(s.exists() for s in stale)
    assert all(k.read_text() == "keep" for k in keep)


def test_atomic_path_removes_stale_siblings_of_dead_processes_only(tmp_path, pids):
    dead, live = pids
    stale, keep = _leftovers(tmp_path, "w.safetensors", dead, live)
    target = tmp_path / "elsewhere"  # a link named like a stale sibling: the link goes, what it points to stays
    target.mkdir()
    (target / "f").write_text("f")
    link = tmp_path / f".linked.tmp-{dead}"
    link.symlink_to(target)
    for name in ("w.safetensors", "linked"):
        with atomic_path(tmp_path / name) as tmp:
            tmp.write_bytes(b"data")
        assert (tmp_path / name).read_bytes() == b"data"
    assert not any(s.exists() for s in stale) and not link.is_symlink()
    assert all(k.read_text() == "keep" for k in keep)
    assert (target / "f").read_text() == "f"
