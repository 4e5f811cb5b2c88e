#!/usr/bin/env python
"""Export throughput (a benchmark, not a test): `finevit convert` of a stage-1 run against copying
the same bytes on the same disk, as a ratio; and the exporting process's peak memory against the
size of what it writes.

A single-process stage-1 run (one step on a generated demo corpus) of a model made larger than the
demo's so that the transfer, not the start-up, is timed (default: encoder 12 x 768, text tower
6 x 512, ~125M parameters, ~0.5 GB in fp32); its checkpoint is exported twice in this process (the
first warms imports and caches) and once by `finevit convert` in a child process for peak memory.

Example:  python bench/convert.py --layers 12 --width 768
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time


def make_run(work: str, layers: int, width: int) -> str:
    from finevit.config import load_config
    from finevit.data.demo import write_demo_corpus
    from finevit.data.corpus import open_corpus
    from finevit.data.tokenizer import corpus_texts, train_sentencepiece
    from finevit.train.stage1 import Stage1Task
    from finevit.train.trainer import Trainer

    write_demo_corpus(work, seed=0, train=64, heldout=0, schemas=("recaption",))
    corpus = open_corpus(os.path.join(work, "recaption", "train"))
    train_sentencepiece(corpus_texts(corpus), os.path.join(work, "caption.model"), 512, model_type="bpe")
    corpus.close()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    heads = width // 64
    cfg = load_config(os.path.join(root, "configs", "stage1", "demo_cpu.yaml"), [
        f"data.corpora=[{{path: {work}/recaption/train}}]", f"data.tokenizer={work}/caption.model",
        f"model.vision.num_layers={layers}", f"model.vision.hidden_size={width}", f"model.vision.num_heads={heads}",
        f"model.vision.ffn_hidden_size={width * 3}", f"model.vision.out_hidden_size={width}",
        "model.text.num_layers=6", "model.text.hidden_size=512", "model.text.num_heads=8",
        "model.text.ffn_hidden_size=2048", "model.contrastive.embed_dim=512", "model.contrastive.pool_heads=8",
        "parallel.tensor=1", "parallel.sequence_parallel=false", "eval.corpora=[]", "eval.at_start=false",
        "schedule.stop_after_steps=1", "checkpoint.save_interval=1", f"logging.run_dir={work}/run",
        "logging.tensorboard=false", "data.num_workers=0"])
    trainer = Trainer(cfg, Stage1Task(cfg)).setup()
    try:
        trainer.train()
    finally:
        trainer.close()
    return os.path.join(work, "run")


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def timed_copy(src: str, dst: str) -> float:
    """Seconds to copy `src` to `dst` and flush it to the disk (as an export's writes are)."""
    t0 = time.perf_counter()
    shutil.copytree(src, dst)
    for d, _, fs in os.walk(dst):
        for f in fs:
            with open(os.path.join(d, f), "rb+") as fh:
                os.fsync(fh.fileno())
    return time.perf_counter() - t0


def _peak_rss(child: subprocess.Popen) -> int:
    """The child's peak resident bytes, polled from /proc (VmHWM) until it exits. Not rusage: a
    forked child's maxrss starts at its parent's resident size and survives exec."""
    peak = 0
    while child.poll() is None:
        try:
            with open(f"/proc/{child.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            break
        time.sleep(0.02)
    return peak


def timed_export(run: str, out: str) -> float:
    from finevit.convert.export import export_run

    t0 = time.perf_counter()
    export_run(run, out, overwrite=True)
    for d, _, fs in os.walk(out):
        for f in fs:
            with open(os.path.join(d, f), "rb+") as fh:
                os.fsync(fh.fileno())
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    os.environ.setdefault("MASTER_PORT", "29519")
    work = tempfile.mkdtemp(prefix="finevit_bench_convert_", dir=os.environ.get("BENCH_DIR"))
    try:
        run = make_run(work, args.layers, args.width)
        ckpt = dir_bytes(os.path.join(run, "checkpoints"))
        timed_export(run, os.path.join(work, "warm"))
        export_s = timed_export(run, os.path.join(work, "export"))
        size = dir_bytes(os.path.join(work, "export"))
        copy_s = timed_copy(os.path.join(work, "export"), os.path.join(work, "copy"))
        t0 = time.perf_counter()
        log = open(os.path.join(work, "convert.log"), "w+")  # a file: a full pipe would stall the child
        child = subprocess.Popen([sys.executable, "-m", "finevit.cli", "convert", run, "--out",
                                  os.path.join(work, "child"), "--overwrite"],
                                 stdout=subprocess.DEVNULL, stderr=log, text=True,
                                 env={k: v for k, v in os.environ.items()  # its own one-process world
                                      if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")})
        peak = _peak_rss(child)
        child_s = time.perf_counter() - t0
        if child.wait():
            log.seek(0)
            print(log.read()[-2000:], file=sys.stderr)
            return 1
        mb = 1e6
        print(f"# export of a stage-1 run: encoder {args.layers} x {args.width}; checkpoint {ckpt / mb:.0f} MB, "
              f"export {size / mb:.0f} MB (fp32 safetensors)")
        print(f"  export (in process, warm):  {export_s:7.2f} s  {size / mb / export_s:8.1f} MB/s")
        print(f"  copy of the same bytes:     {copy_s:7.2f} s  {size / mb / copy_s:8.1f} MB/s")
        print(f"  ratio export / copy time:   {export_s / copy_s:7.2f}x")
        print(f"  finevit convert (a process, imports included): {child_s:.1f} s, peak RSS {peak / mb:.0f} MB "
              f"= {peak / size:.1f}x the exported bytes")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
