"""lorakit on several GPUs (issue 16): 1 GPU vs 2 GPUs with DDP and with FSDP2, for LoRA, DoRA and QLoRA.

Every configuration is its own ``torchrun`` job (``python -m torch.distributed.run --standalone``), one
process group each, whose ranks run lorakit's own distributed training: ``lorakit.world.start`` joins
the group, ``lorakit.train.distributed.resolve_mode`` settles ``train.distributed``, and
``Trainer.train`` trains (its global batches split over the ranks, DDP / FSDP2 wrapping, token-weighted
loss over ranks, the checkpoint and evaluation at the end). Only the model and the data are the
benchmark's: random-weight Llama-3.2-1B and Qwen2.5-0.5B shapes built by ``scripts/bench_gpu.py``
(``build_model``; QLoRA: its NF4 base), random tokens (row i always the same tokens, so every world size
sees the same rows).

GPU (default): bf16 (the recipe's ``train.precision: auto``), batch 8 × 1024 per GPU, r = 16 / alpha 32 /
dropout 0 on all seven projections, lr 1e-4 constant, no weight decay, clipping 1.0, the recipe's
defaults otherwise (``train.compile: auto``). Per configuration: tokens/s of the whole step (all
ranks) over the steps after ``--warmup``, peak ``torch.cuda.max_memory_allocated`` per GPU (the largest
rank), scaling efficiency = tokens/s on 2 GPUs ÷ (2 × tokens/s on 1 GPU), memory ÷ 1 GPU.
Loss check: the 2-GPU run at ``batch/2`` per GPU against the 1-GPU run at ``batch`` (the same global
batch, the same rows): max |difference| over the first ``--steps`` losses.
Largest batch: per-GPU rows of ``--seq`` tokens that train 2 steps (``train.compile: false``, as
``bench_gpu.py --max-batch``), doubling then bisecting, each probe its own torchrun job.

CPU (``--cpu-smoke``): the same jobs with gloo, 2 processes, the tiny shapes of bench_gpu.py, fp32,
batch 2 × 32 per process; peak memory is the process's peak RSS (``ru_maxrss``). It checks the script,
not speed.

Usage: python scripts/bench_distributed.py [--shapes ...] [--methods lora dora qlora] [--modes ddp fsdp]
           [--nproc 2] [--batch 8] [--seq 1024] [--steps 20] [--warmup 5] [--loss-check SHAPE:METHOD:MODE ...]
           [--max-batch SHAPE:METHOD:MODE ...] [--budget S] [--out bench_distributed.json]
       python scripts/bench_distributed.py --cpu-smoke [--out ...]
       python scripts/bench_distributed.py --merge a.json b.json --out all.json
Results: docs/benchmarks.md, "Several GPUs (issue 16)".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_setup as bench_gpu  # noqa: E402  (the shapes and model builder of the one-GPU bench, bench_gpu.py)

GIB = bench_gpu.GIB
METHODS = ["lora", "dora", "qlora"]
LABEL = {"single": "1 GPU", "ddp": "DDP", "fsdp": "FSDP2"}


# ---- one rank of one configuration (runs under torchrun) -------------------------------------------
class RandomRows:
    """Training / evaluation data of random tokens: row i is always the same ``seq`` tokens (seeded by
    i), labels = inputs; ``collate`` stacks the rows it is given (as lorakit's collators do)."""

    def __init__(self, vocab: int, seq: int, n_train: int, n_eval: int):
        self.vocab, self.seq = vocab, seq
        self.train, self.eval = list(range(n_train)), list(range(n_train, n_train + n_eval))
        self.label_names = None

    def collate(self, rows: list[int]) -> dict:
        import torch

        ids = torch.stack([torch.randint(0, self.vocab, (self.seq,), generator=torch.Generator().manual_seed(1000 + i))
                           for i in rows])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def worker(spec: dict) -> None:
    """Train one configuration on this rank; rank files ``rank{r}.json`` in ``spec['out']``."""
    import torch
    from rich.console import Console

    from lorakit.config import recipe_from_dict
    from lorakit.device import model_device
    from lorakit.methods import build_method
    from lorakit.quant import prepare_kbit_model
    from lorakit.train.distributed import resolve_mode
    from lorakit.train.loop import Trainer
    from lorakit import world as world_

    world = world_.start(timeout_s=spec["timeout_s"])  # a stuck peer ends the job instead of hanging
    out = Path(spec["out"])
    name, quant = spec["method"], spec["method"] == "qlora"
    global_rows = spec["batch"] * world.size
    recipe = recipe_from_dict({
        "model": {"quantization": "nf4" if quant else None},
        "method": {"name": name, "r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": bench_gpu.SEVEN},
        "train": {"learning_rate": 1e-4, "batch_size": spec["batch"], "eval_batch_size": 1,
                  "max_steps": spec["steps"], "lr_scheduler": "constant", "weight_decay": 0.0,
                  "max_grad_norm": 1.0, "log_every": 1, "num_samples": 0,
                  "distributed": "auto" if spec["mode"] == "single" else spec["mode"],
                  **({"compile": spec["compile"]} if spec.get("compile") is not None else {}),
                  **({"precision": spec["precision"]} if spec.get("precision") else {})},
        "output_dir": str(out / "run")})
    device = model_device()
    result: dict = {"rank": world.rank}
    t_start = time.perf_counter()
    try:
        model = bench_gpu.build_model(spec["shape"], device, quant, recipe.train.precision)  # seed 0 on every rank
        if quant:
            prepare_kbit_model(model)
        torch.manual_seed(recipe.train.seed)  # the same adapter on every rank
        method = build_method(recipe.method)
        method.attach(model, "causal_lm")
        model.to(device) if not quant else None
        world, note = resolve_mode(world, recipe.train.distributed, method)
        data = RandomRows(bench_gpu.vocab_of(spec["shape"]), spec["seq"], global_rows * spec["steps"], world.size)
        trainer = Trainer(model, None, method, data, recipe, device, Console(quiet=True), world=world)
        records: list[tuple[float, dict]] = []  # (time read, metrics.jsonl record); rank 0 alone logs
        trainer.on_record.append(lambda r: records.append((time.perf_counter(), r)))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        setup_s = time.perf_counter() - t_start
        trainer.train()
        result.update(mode=world.mode, note=note, setup_s=setup_s, levers=trainer.speed_summary())
        steps = [(t, r) for t, r in records if "loss" in r]
        if world.is_main:
            warm = spec["warmup"]
            timed = [r for _, r in steps[warm:]]
            t0 = steps[warm - 1][0] if warm > 0 else None
            tokens = global_rows * spec["seq"] * len(timed)  # every row is seq tokens (no padding)
            result.update(losses=[r["loss"] for _, r in steps],
                          tokens_per_s=tokens / (steps[-1][0] - t0) if t0 is not None and timed else None,
                          timed_steps=len(timed))
    except torch.OutOfMemoryError as err:
        result["error"] = f"OutOfMemoryError: {str(err).splitlines()[0]}"
    except Exception as err:  # the parent reports it as the row's error; torchrun stops the other ranks
        oom = any(k in str(err).lower() for k in ("out of memory", "alloc_failed"))  # cuBLAS / NCCL allocations
        result["error"] = f"{'OutOfMemoryError' if oom else type(err).__name__}: {str(err)[:300]}"
        result["traceback"] = traceback.format_exc()[-4000:]
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    else:
        result["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # peak RSS, whole process
    (out / f"rank{world.rank}.json").write_text(json.dumps(result))
    if "error" in result:
        sys.exit(1)
    world_.close(world)


# ---- the parent: one torchrun job per configuration ------------------------------------------------
def run_job(cmd: list[str], env: dict, timeout_s: float) -> tuple[int | None, str]:
    """(exit status or None past ``timeout_s``, the output's tail) of a torchrun job. When it runs too long
    or this process is stopped (Ctrl-C, SIGTERM), torchrun gets SIGTERM first, which stops its workers
    (a SIGKILL would leave them holding the GPUs)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, out[-2000:]
    except BaseException as err:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        if isinstance(err, subprocess.TimeoutExpired):
            return None, "the job ran past --job-timeout"
        raise


def launch(args, shape: str, method: str, mode: str, nproc: int, batch: int, steps: int, warmup: int,
           compile_: object = None) -> dict:
    """Run one configuration through torchrun; returns its row (``error`` set when a rank failed)."""
    spec = {"shape": shape, "method": method, "mode": mode, "batch": batch, "seq": args.seq, "steps": steps,
            "warmup": warmup, "compile": compile_, "precision": args.precision, "timeout_s": args.job_timeout}
    row = {"shape": shape, "method": method, "mode": mode, "gpus": nproc, "batch_per_gpu": batch, "seq": args.seq}
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        spec["out"] = tmp
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        t0 = time.perf_counter()
        env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if args.cpu_smoke else {})}  # CPU: 1 thread per process
        rc, tail = run_job(cmd, env, args.job_timeout + 60)
        row["wall_s"] = time.perf_counter() - t0
        ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
    errors = [r["error"] for r in ranks if "error" in r]
    if errors or rc != 0 or not ranks:
        row["error"] = errors[0] if errors else f"exit {rc}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"
        if not errors:
            row["output_tail"] = tail
    failed = next((r for r in ranks if "traceback" in r), None)
    if failed:
        row["traceback"] = failed["traceback"]
    main = next((r for r in ranks if r["rank"] == 0), {})
    row.update({k: main[k] for k in ("tokens_per_s", "losses", "timed_steps", "note", "setup_s", "levers")
                if k in main})
    if "mode" in main:
        row["ran"] = main["mode"]  # the world's mode (an unshardable method runs DDP under fsdp)
    if ranks:
        row["peak_gib_per_rank"] = [r.get("peak_gib") for r in sorted(ranks, key=lambda r: r["rank"])]
        row["peak_gib"] = max(p for p in row["peak_gib_per_rank"] if p is not None)
    return row


class OutOfTime(Exception):
    pass


def largest_batch(args, shape: str, method: str, mode: str, log, over_budget) -> dict:
    """Largest per-GPU batch (rows of ``args.seq``) that trains 2 steps, to ``args.max_batch_step`` rows;
    a search cut by the budget reports its bounds so far (``cut``)."""
    probes: dict[int, bool] = {}

    def fits(b: int) -> bool:
        if over_budget(f"max batch {shape}:{method}:{mode} batch {b}"):
            raise OutOfTime
        row = launch(args, shape, method, mode, args.nproc, b, steps=2, warmup=0, compile_=False)
        ok = "error" not in row
        if not ok and "OutOfMemoryError" not in row["error"]:
            raise RuntimeError(f"batch {b}: {row['error']}")
        probes[b] = ok
        log(f"    {shape} {method} {mode} batch {b}/GPU: {'fits' if ok else 'OOM'} ({row['wall_s']:.0f} s)")
        return ok

    lo, hi, b, cut = 0, None, args.max_batch_start, False
    try:
        while b <= args.max_batch_limit:  # doubling until a batch does not fit
            if not fits(b):
                hi = b
                break
            lo, b = b, b * 2
        while hi is not None and hi - lo > args.max_batch_step:  # then bisecting
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    except OutOfTime:
        cut = True
    return {"shape": shape, "method": method, "mode": mode, "gpus": args.nproc, "rows_per_gpu": lo,
            "tokens_per_gpu": lo * args.seq, "resolution_rows": (hi - lo) if hi else 0, "probes": probes,
            "capped": hi is None and not cut, "cut": cut}


def with_ratios(rows: list[dict]) -> None:
    """Scaling efficiency and memory ratio of each multi-GPU row against its 1-GPU row."""
    single = {(r["shape"], r["method"]): r for r in rows if r["gpus"] == 1 and "error" not in r}
    for r in rows:
        one = single.get((r["shape"], r["method"]))
        if r["gpus"] > 1 and one and "error" not in r and r.get("tokens_per_s") and one.get("tokens_per_s"):
            r["scaling_efficiency"] = r["tokens_per_s"] / (r["gpus"] * one["tokens_per_s"])
            r["memory_vs_1gpu"] = r["peak_gib"] / one["peak_gib"]


def table(results: dict) -> str:
    gpu = results["device"] != "cpu"
    one, many = ("GPU", "GPUs") if gpu else ("process", "processes")  # --cpu-smoke: processes, gloo
    unit = "GiB/GPU" if gpu else "GiB RSS/process"
    lines = [f"| shape | method | setup | tokens/s | peak {unit} | scaling efficiency | memory ÷ 1 {one} |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        setup = f"1 {one}" if r["gpus"] == 1 else f"{r['gpus']} {many}, {LABEL[r['mode']]}"
        if r["gpus"] > 1 and r.get("ran") and r["ran"] != r["mode"]:
            setup += f" (ran {LABEL.get(r['ran'], r['ran'])})"
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['method']} | {setup} | error: {r['error'][:120]} | | | |")
            continue
        eff = f"{r['scaling_efficiency']:.2f}" if "scaling_efficiency" in r else ""
        mem = f"{r['memory_vs_1gpu']:.2f}" if "memory_vs_1gpu" in r else ""
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "?"
        lines.append(f"| {r['shape']} | {r['method']} | {setup} | {tps} | {r['peak_gib']:.2f} | {eff} | {mem} |")
    if results.get("loss_checks"):
        lines += ["", f"| loss check | 1 {one}: batch | 2 {many}: batch each | steps | max abs diff | max rel diff |",
                  "|---|---|---|---|---|---|"]
        for c in results["loss_checks"]:
            what = f"{c['shape']} {c['method']} {LABEL[c['mode']]}"
            if "error" in c:
                lines.append(f"| {what} | | | | error: {c['error'][:120]} | |")
            else:
                lines.append(f"| {what} | {c['batch_1gpu']} | {c['batch_per_gpu']} | {c['steps']} | "
                             f"{c['max_abs_diff']:.2e} | {c['max_rel_diff']:.2e} |")
    if results.get("max_batch"):
        lines += ["", f"| largest batch | {many} | rows per {one} (× seq) | tokens per {one} |", "|---|---|---|---|"]
        for m in results["max_batch"]:
            what = f"{m['shape']} {m['method']} {LABEL[m['mode']]}"
            if "error" in m:
                lines.append(f"| {what} | {m['gpus']} | error: {m['error'][:120]} | |")
            else:
                cap = (" (fits the search limit)" if m["capped"] else
                       " (at least; the search was cut by --budget)" if m.get("cut") else
                       f" (< {m['rows_per_gpu'] + m['resolution_rows']} OOM)")
                lines.append(f"| {what} | {m['gpus']} | {m['rows_per_gpu']}{cap} | {m['tokens_per_gpu']:,} |")
    return "\n".join(lines)


def loss_check(args, shape: str, method: str, mode: str, single_runs: dict) -> dict:
    """2 GPUs at batch/2 per GPU vs 1 GPU at batch: the same global batch, the same rows."""
    half = args.batch // args.nproc
    one = single_runs.get((shape, method))
    if one is None or "error" in one or len(one.get("losses", [])) < args.steps:
        one = launch(args, shape, method, "single", 1, args.batch, args.steps, args.warmup)
    two = launch(args, shape, method, mode, args.nproc, half, args.steps, args.warmup)
    check = {"shape": shape, "method": method, "mode": mode, "batch_1gpu": args.batch, "batch_per_gpu": half,
             "gpus": args.nproc, "ran": two.get("ran"), "peak_gib_per_rank": two.get("peak_gib_per_rank")}
    if "error" in one or "error" in two:
        check["error"] = one.get("error") or two.get("error")
        return check
    a, b = one["losses"][: args.steps], two["losses"][: args.steps]
    diffs = [abs(x - y) for x, y in zip(a, b)]
    check.update(steps=len(diffs), losses_1gpu=a, losses_2gpu=b, max_abs_diff=max(diffs),
                 max_rel_diff=max(d / abs(x) for d, x in zip(diffs, a)))
    return check


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cpu-smoke", action="store_true", help="gloo, 2 processes, tiny shapes: checks the script")
    ap.add_argument("--shapes", nargs="*")
    ap.add_argument("--methods", nargs="*", choices=METHODS)
    ap.add_argument("--modes", nargs="*", choices=["ddp", "fsdp"], default=["ddp", "fsdp"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batch", type=int, help="rows per GPU (default 8; CPU smoke 2)")
    ap.add_argument("--seq", type=int, help="tokens per row (default 1024; CPU smoke 32)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per configuration (losses compared over these)")
    ap.add_argument("--warmup", type=int, default=5, help="steps not timed (compile, CUDA graphs)")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="train.precision (default: auto)")
    ap.add_argument("--loss-check", nargs="*", metavar="SHAPE:METHOD:MODE",
                    help="default: the last shape's LoRA under each mode and QLoRA under FSDP2")
    ap.add_argument("--max-batch", nargs="*", metavar="SHAPE:METHOD:MODE",
                    help="default on CUDA: llama-3.2-1b:qlora:fsdp llama-3.2-1b:lora:ddp")
    ap.add_argument("--max-batch-start", type=int, default=16)
    ap.add_argument("--max-batch-step", type=int, default=8, help="resolution of the search, rows")
    ap.add_argument("--max-batch-limit", type=int, default=256, help="rows per GPU searched at most")
    ap.add_argument("--no-rows", action="store_true", help="skip the throughput rows (loss checks / max batch only)")
    ap.add_argument("--job-timeout", type=int, default=300, help="seconds per torchrun job")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds; no new job starts past it")
    ap.add_argument("--out", default="bench_distributed.json")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge the results of several calls into --out")
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if args.merge:
        merged = json.loads(Path(args.merge[0]).read_text())
        for extra in args.merge[1:]:
            more = json.loads(Path(extra).read_text())
            for key in ("rows", "loss_checks", "max_batch"):
                merged[key] += more.get(key, [])
            merged["command"] = f"{merged['command']}; {more['command']}"
        with_ratios(merged["rows"])
        Path(args.out).write_text(json.dumps(merged, indent=1))
        return print(table(merged))

    import torch

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stops the running job too (run_job)
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if args.cpu_smoke:
        args.shapes = args.shapes or ["tiny-llama", "tiny-qwen"]
        args.batch, args.seq = args.batch or 2, args.seq or 32
        args.max_batch = ["tiny-llama:qlora:fsdp", "tiny-llama:lora:ddp"] if args.max_batch is None else args.max_batch
        args.max_batch_start, args.max_batch_step, args.max_batch_limit = 1, 1, 2  # no memory limit: the code path
    else:
        args.shapes = args.shapes or ["qwen2.5-0.5b", "llama-3.2-1b"]
        args.batch, args.seq = args.batch or 8, args.seq or 1024
        if args.max_batch is None:
            args.max_batch = ["llama-3.2-1b:qlora:fsdp", "llama-3.2-1b:lora:ddp"] if cuda else []
    if cuda and torch.cuda.device_count() < args.nproc:
        sys.exit(f"error: {args.nproc} processes need {args.nproc} GPUs; this machine has {torch.cuda.device_count()}")
    if args.batch % args.nproc:
        sys.exit(f"error: --batch {args.batch} must split over {args.nproc} processes for the loss check")
    methods = args.methods or METHODS
    checks = args.loss_check if args.loss_check is not None else (
        [f"{args.shapes[-1]}:lora:{m}" for m in args.modes] + [f"{args.shapes[-1]}:qlora:fsdp"] * ("fsdp" in args.modes))
    start = time.perf_counter()
    results = {"device": torch.cuda.get_device_name(0) if cuda else "cpu",
               "gpus_visible": torch.cuda.device_count() if cuda else 0, "torch": torch.__version__,
               "nproc": args.nproc, "batch_per_gpu": args.batch, "seq": args.seq, "steps": args.steps,
               "warmup": args.warmup, "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "rows": [], "loss_checks": [], "max_batch": []}

    def log(line: str) -> None:
        print(line, flush=True)

    def save() -> None:
        with_ratios(results["rows"])
        results["wall_s"] = time.perf_counter() - start
        Path(args.out).write_text(json.dumps(results, indent=1))

    def over_budget(what: str) -> bool:
        if time.perf_counter() - start > args.budget:
            log(f"budget reached: skipping {what}")
            results.setdefault("skipped", []).append(what)
            return True
        return False

    single_runs: dict = {}
    for shape in [] if args.no_rows else args.shapes:
        for method in methods:
            for mode, nproc in [("single", 1)] + [(m, args.nproc) for m in args.modes]:
                what = f"{shape} {method} {LABEL[mode]}"
                if over_budget(what):
                    continue
                row = launch(args, shape, method, mode, nproc, args.batch, args.steps, args.warmup)
                if mode == "single":
                    single_runs[(shape, method)] = row
                results["rows"].append({k: v for k, v in row.items() if k != "losses"} | {"losses": row.get("losses")})
                log(f"{what}: " + (row["error"] if "error" in row else
                                   f"{row.get('tokens_per_s') or 0:,.0f} tokens/s, peak {row['peak_gib']:.2f} GiB "
                                   f"({row['wall_s']:.0f} s)"))
                save()
    for spec in checks:
        shape, method, mode = spec.split(":")
        if over_budget(f"loss check {spec}"):
            continue
        check = loss_check(args, shape, method, mode, single_runs)
        results["loss_checks"].append(check)
        log(f"loss check {spec}: " + (check["error"] if "error" in check else
                                      f"max |diff| {check['max_abs_diff']:.2e} over {check['steps']} steps"))
        save()
    for spec in args.max_batch:
        shape, method, mode = spec.split(":")
        if over_budget(f"max batch {spec}"):
            continue
        try:
            found = largest_batch(args, shape, method, mode, log, over_budget)
        except RuntimeError as err:
            found = {"shape": shape, "method": method, "mode": mode, "gpus": args.nproc, "error": str(err)}
        results["max_batch"].append(found)
        save()
    save()
    log(f"\n{results['device']}, torch {results['torch']}, {args.nproc} processes, batch {args.batch} x {args.seq} "
        f"per {'GPU' if cuda else 'process'}, {args.steps} steps ({args.warmup} not timed), {results['wall_s']:.0f} s")
    log(table(results))


if __name__ == "__main__":
    main()
