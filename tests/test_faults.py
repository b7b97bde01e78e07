"""Faults during a run: a SIGKILL after a checkpoint, a second writer on the same output, a full disk while
saving, a kill during evaluation or save. Nothing that looks complete is left, and nothing done is lost."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunequant.cli import main
from tiny import TRAIN_TEXT, save_tiny

SRC = Path(__file__).resolve().parents[1] / "src"
CALIB = ("Alpha beta gamma delta. " * 40 + "\n") * 30
FAST = ["--calib-samples", "4", "--seq-len", "16"]

# Runs the CLI, but stops for good once block 0's checkpoint is on disk (and says so in a marker file),
# so that the test can SIGKILL it at a known point.
STOP_AFTER_BLOCK_0 = """
import pathlib, sys, time
import prunequant.checkpoint as ck
save = ck.Checkpoint.save_block
def save_then_wait(self, i, *a, **k):
    save(self, i, *a, **k)
    if i == 0:
        self.wait()  # save_block hands the files to a writer thread; the marker must follow them to disk
        pathlib.Path(sys.argv[1]).write_text("block 0 saved")
        time.sleep(600)
ck.Checkpoint.save_block = save_then_wait
from prunequant.cli import main
sys.exit(main(sys.argv[2:]))
"""

HOLD_LOCK = """
import sys, time
from prunequant.outputs import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _env():
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "prunequant.cli", *map(str, args)], env=_env(), capture_output=True,
                          text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    save_tiny(d / "tiny")
    (d / "calib.txt").write_text(CALIB)
    (d / "eval.txt").write_text(TRAIN_TEXT * 20)
    return d


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


VOLATILE = ("seconds", "created", "resumed_blocks", "timings")


def _stable_record(raw: bytes) -> dict:
    rec = json.loads(raw)
    for k in VOLATILE:
        rec.pop(k, None)
    for layer in rec.get("layers", {}).values():
        layer.pop("seconds", None)
    return rec


@pytest.mark.parametrize("quant", ["gptq:4:g32", "rtn:4:g32"])  # the engine, and the data-free path RTN takes
def test_sigkill_after_a_checkpoint_then_resume_gives_the_same_bytes(env, tmp_path, quant):
    args = ["compress", env / "tiny", "--quant", quant, "--calib-text", env / "calib.txt", *FAST]
    ref = _cli(*args, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    out, marker = tmp_path / "out", tmp_path / "marker"
    p = subprocess.Popen([sys.executable, "-c", STOP_AFTER_BLOCK_0, marker, *map(str, args), "--out", out],
                         env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert p.poll() is None, p.stderr.read()
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.1)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGKILL and not out.exists()
    assert json.loads(next(Path(str(out) + ".prunequant-work").glob("*/progress.json")).read_text())["done"] == 1
    resumed = _cli(*args, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    assert f"taking over the lock {out}.prunequant-lock of process {p.pid}" in resumed.stderr
    a, b = _files(tmp_path / "ref"), _files(out)
    assert a.keys() == b.keys()
    for name in a:  # every weight, config and tokenizer byte; the run record up to its timings
        if name == "prunequant.json":
            assert _stable_record(a[name]) == _stable_record(b[name])
        elif name != "prunequant-manifest.json":  # it hashes prunequant.json, whose timings differ
            assert a[name] == b[name], name
    assert json.loads(b["prunequant.json"])["resumed_blocks"] == 1
    assert not Path(str(out) + ".prunequant-work").exists() and not Path(str(out) + ".prunequant-lock").exists()


def test_a_second_writer_is_refused_and_a_dead_ones_lock_taken_over(env, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, out], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t = time.time()
        code = main(["compress", str(env / "tiny"), "--quant", "rtn:4:g32", "--calib-text", str(env / "calib.txt"),
                     *FAST, "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 1 and f"being written by process {holder.pid}" in err and time.time() - t < 5
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait(30)
    code = main(["compress", str(env / "tiny"), "--quant", "rtn:4:g32", "--calib-text", str(env / "calib.txt"), *FAST,
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert f"of process {holder.pid}, which is no longer running" in caplog.text
    assert not Path(str(out) + ".prunequant-lock").exists()


def test_two_runs_on_one_output_never_both_succeed(env, tmp_path):
    out = tmp_path / "G"
    runs = [subprocess.Popen([sys.executable, "-m", "prunequant.cli", "compress", str(env / "tiny"), "--quant",
                              f"rtn:{b}:g32", "--calib-text", str(env / "calib.txt"), *FAST, "--out", str(out)],
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for b in (4, 8)]
    results = [(p.wait(300), p.stderr.read()) for p in runs]
    codes = [c for c, _ in results]
    assert sorted(codes)[0] == 0 and sorted(codes)[1] in (1, 2), results
    loser = results[codes.index(sorted(codes)[1])][1]
    # the winner may hold the lock before it has written its pid into it: then the loser names no process
    assert "is being written by" in loser or "already exists" in loser
    bits = json.loads((out / "prunequant.json").read_text())["recipe"]["quant"]["bits"]
    assert bits == (4, 8)[codes.index(0)]  # the output is the run that said it succeeded


def test_disk_full_while_saving_leaves_nothing_that_looks_complete(env, tmp_path, capsys, monkeypatch):
    import errno

    from prunequant.export import integrity

    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the earlier output")
    flush = integrity.ShardWriter.flush

    def full(self):
        if self.pending:
            (self.root / "model.part00001.safetensors").write_bytes(b"\0" * 100)  # a partial shard
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(integrity.ShardWriter, "flush", full)
    args = ["compress", env / "tiny", "--quant", "gptq:4:g32", "--calib-text", env / "calib.txt", *FAST, "--out", out,
            "--overwrite"]
    code = main(list(map(str, args)))
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err and "free some space" in err
    assert _files(out) == {"mine.txt": b"the earlier output"}  # --overwrite replaces only with a complete output
    assert not list(tmp_path.glob(".out.partial-*"))
    assert list(Path(str(out) + ".prunequant-work").glob("*/progress.json"))  # the compression is kept
    monkeypatch.setattr(integrity.ShardWriter, "flush", flush)
    code = main(list(map(str, args)))
    assert code == 0, capsys.readouterr().err
    rec = json.loads((out / "prunequant.json").read_text())
    assert rec["resumed_blocks"] == 2 and not (out / "mine.txt").exists()
    from prunequant.export import verify_manifest

    verify_manifest(out)


def test_kill_during_evaluation_or_save_resumes_without_recompressing(env, tmp_path, capsys, monkeypatch):
    import prunequant.api as api
    import prunequant.engine as engine
    import prunequant.evaluate.suite as suite

    out = tmp_path / "out"
    args = list(map(str, ["compress", env / "tiny", "--quant", "gptq:4:g32", "--calib-text", env / "calib.txt", *FAST,
                          "--eval", "--text", env / "eval.txt", "--max-tokens", "256", "--agree-tokens", "64",
                          "--out", out]))
    real_suite, real_save, real_block = suite.run_suite, api.save, engine._compress_block
    calls = {"suite": 0}

    def killed(*a, **k):
        raise KeyboardInterrupt

    def counted_suite(*a, **k):
        calls["suite"] += 1
        return real_suite(*a, **k)

    monkeypatch.setattr(suite, "run_suite", killed)  # killed during the evaluation
    assert main(args) == 130 and not out.exists()
    monkeypatch.setattr(suite, "run_suite", counted_suite)
    monkeypatch.setattr(engine, "_compress_block", killed)  # any recompression would fail the run
    monkeypatch.setattr(api, "save", killed)  # killed during the save
    assert main(args) == 130 and not out.exists() and calls["suite"] == 1
    monkeypatch.setattr(api, "save", real_save)
    code = main(args)
    stdout = capsys.readouterr().out
    assert code == 0 and calls["suite"] == 1 and "reusing the result recorded" in stdout
    rec = json.loads((out / "prunequant.json").read_text())
    assert rec["resumed_blocks"] == 2 and rec["evaluation"]["compressed"]["texts"]
    assert not Path(str(out) + ".prunequant-work").exists()
    monkeypatch.setattr(engine, "_compress_block", real_block)


def test_output_created_meanwhile_is_never_replaced(env, tmp_path, capsys, monkeypatch):
    from prunequant.export import integrity

    out = tmp_path / "out"
    close = integrity.ShardWriter.close

    def someone_else_writes(self):
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
        return close(self)

    monkeypatch.setattr(integrity.ShardWriter, "close", someone_else_writes)
    code = main(list(map(str, ["compress", env / "tiny", "--quant", "rtn:4:g32", "--calib-text", env / "calib.txt",
                               *FAST, "--out", out])))
    err = capsys.readouterr().err
    assert code == 1 and "was not replaced" in err and _files(out) == {"theirs.txt": b"theirs"}
    assert not list(tmp_path.glob(".out.partial-*"))
