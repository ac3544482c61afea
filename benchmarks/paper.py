"""Reproduce the experiments of Ballini et al. (arXiv 2602.20467) with ecprune-onnx.

For each task (digits; diffusion-sorption at three noise levels), architecture and seed:
train a tanh MLP -> export ONNX -> prune with every method at ratios 0.1 .. 0.9 -> test loss
(onnxruntime) -> fine-tune the pruned file -> test loss again. Baselines beside the library's
methods: the fully-connected one (a dense MLP trained from scratch with as many weights as
the pruned one keeps) and the non-linear one (``benchmarks/nonlinear.py``). Writes
``paper_results.json``, ``paper_tables.md`` and one PNG per task and architecture into
``--out`` (default ``benchmarks/figures``).

    python benchmarks/paper.py            # the full run (about 40 min on a 2-core CPU)
    python benchmarks/paper.py --quick    # a tiny run, under a minute

Each finished (task, architecture, seed) job is saved under ``OUT/paper_jobs/``; running the
same command again skips those and renders the report from all saved jobs (``--fresh``
starts over). ``--seeds 2`` renders the first two seeds only.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import tasks  # noqa: E402
from benchmarks.nonlinear import apply_shifts, nonlinear_scores  # noqa: E402

# Where the full run's figures and tables are committed.
FIGURES = Path(__file__).resolve().parent / "figures"

LIBRARY_METHODS = ("ec", "magnitude", "gradient", "random", "wanda", "sensitivity")
NONLINEAR, DENSE, UNPRUNED = "non-linear", "fully-connected", "unpruned"
METHODS = (*LIBRARY_METHODS, NONLINEAR, DENSE)
RATIOS = tuple(round(0.1 * k, 1) for k in range(1, 10))


@dataclass(frozen=True)
class Training:
    epochs: int
    batch_size: int
    lr: float


@dataclass(frozen=True)
class Config:
    datasets: tuple[tuple[str, float], ...]  # (task, noise)
    hidden: dict  # task -> list of hidden-layer tuples
    ratios: tuple[float, ...]
    seeds: int
    calib_rows: int
    train: dict  # task -> Training
    finetune: dict  # task -> Training
    validation: float  # share of the training split finetune holds out to pick its epoch


FULL = Config(
    datasets=(("digits", 0.0), ("ds", 0.0), ("ds", 0.005), ("ds", 0.05)),
    hidden={"digits": [(32, 32), (64, 64)], "ds": [(32, 32), (64, 64)]},
    ratios=RATIOS,
    seeds=3,
    calib_rows=256,
    train={"digits": Training(60, 64, 3e-3), "ds": Training(100, 64, 3e-3)},
    finetune={"digits": Training(10, 128, 1e-3), "ds": Training(10, 128, 1e-3)},
    validation=0.1,
)
QUICK = replace(
    FULL,
    datasets=(("digits", 0.0), ("ds", 0.005)),
    hidden={"digits": [(16, 16)], "ds": [(16, 16)]},
    ratios=(0.3, 0.7),
    seeds=1,
    calib_rows=64,
    train={"digits": Training(5, 64, 3e-3), "ds": Training(5, 128, 3e-3)},
    finetune={"digits": Training(1, 128, 1e-3), "ds": Training(1, 128, 1e-3)},
)


@dataclass(frozen=True)
class Job:
    task: str
    noise: float
    hidden: tuple[int, ...]
    seed: int


def arch_label(hidden: tuple[int, ...]) -> str:
    return "x".join(str(h) for h in hidden)


def dense_width(sizes: list[int], kept_weights: float) -> int:
    """Hidden width h of an MLP of the same depth with about ``kept_weights`` weights.

    Weights of in-h-...-h-out with d hidden layers: (d - 1) h² + (in + out) h.
    """
    depth = len(sizes) - 2
    n_in, n_out = sizes[0], sizes[-1]
    if depth == 1:
        return max(1, round(kept_weights / (n_in + n_out)))
    a, b = depth - 1, n_in + n_out
    return max(1, round((-b + math.sqrt(b * b + 4 * a * kept_weights)) / (2 * a)))


def _record(job: Job, method: str, ratio: float, pruned: dict, tuned: dict, **extra) -> dict:
    row = {
        "task": job.task,
        "noise": job.noise,
        "arch": arch_label(job.hidden),
        "seed": job.seed,
        "method": method,
        "ratio": ratio,
        "loss": pruned["loss"],
        "loss_ft": tuned["loss"],
    }
    if "accuracy" in pruned:
        row |= {"accuracy": pruned["accuracy"], "accuracy_ft": tuned["accuracy"]}
    return row | extra


class JobRunner:
    """One (task, noise, architecture, seed): the trained model and all its pruned copies."""

    def __init__(self, job: Job, config: Config, folder: Path):
        self.job, self.config, self.folder = job, config, folder
        self.task = tasks.load_task(job.task, job.noise, job.seed, config.calib_rows)
        n_in, n_out = self.task.sizes_in_out
        self.sizes = [n_in, *job.hidden, n_out]
        self.calib = folder / "calib.npz"
        self.train_npz = folder / "train.npz"
        tasks.write_npz(self.calib, self.task.x_calib, self.task.y_calib)
        tasks.write_npz(self.train_npz, self.task.x_train, self.task.y_train)
        self.timing: dict[str, float] = {}

    def _timed(self, key: str, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.timing[key] = self.timing.get(key, 0.0) + time.perf_counter() - start
        return result

    def train(self, sizes: list[int], path: Path) -> dict:
        t = self.config.train[self.job.task]
        model = self._timed(
            "train", tasks.train_mlp, self.task, sizes, self.job.seed, t.epochs, t.batch_size, t.lr
        )
        tasks.export_onnx(model, path)
        return tasks.held_out_metrics(path, self.task)

    def finetune(self, path: Path) -> dict:
        from ecprune_onnx.finetune import finetune

        t = self.config.finetune[self.job.task]
        tuned = path.with_suffix(".ft.onnx")
        self._timed(
            "finetune",
            finetune,
            path,
            self.train_npz,
            tuned,
            labels="y",
            epochs=t.epochs,
            learning_rate=t.lr,
            batch_size=t.batch_size,
            seed=self.job.seed,
            validation=self.config.validation,
            device="cpu",
            force=True,
        )
        return tasks.held_out_metrics(tuned, self.task)

    def prune(self, base: Path, method: str, ratio: float, nonlinear=None) -> tuple[Path, float]:
        """Compress ``base``; returns the pruned file and its measured weight sparsity."""
        from ecprune_onnx import compress

        out = self.folder / f"{method}_{ratio}.onnx"
        if method == NONLINEAR:
            # Precomputed importances; the paper's compensation (the 1-D optimal shifts)
            # is added after, so the library's linearised shift is switched off.
            result = self._timed(
                method, compress, base, None, ratio, output=out, method="magnitude",
                scores=nonlinear.importance, compensate=False, force=True,
            )  # fmt: skip
            apply_shifts(out, nonlinear)
        else:
            result = self._timed(
                method, compress, base, self.calib, ratio, labels="y", output=out,
                method=method, seed=self.job.seed, device="cpu", force=True,
            )  # fmt: skip
        return out, result.sparsity

    def run(self) -> list[dict]:
        job, base = self.job, self.folder / "base.onnx"
        reference = self.train(self.sizes, base)
        rows = [_record(job, UNPRUNED, 0.0, reference, self.finetune(base))]
        nonlinear = self._timed("non-linear scores", nonlinear_scores, base, self.task.x_calib)
        for method in (*LIBRARY_METHODS, NONLINEAR):
            for ratio in self.config.ratios:
                path, sparsity = self.prune(base, method, ratio, nonlinear)
                pruned = tasks.held_out_metrics(path, self.task)
                tuned = self.finetune(path)
                rows.append(_record(job, method, ratio, pruned, tuned, sparsity=sparsity))
        rows += self.dense_baseline()
        return rows

    def dense_baseline(self) -> list[dict]:
        """Dense MLPs with as many weights as each pruned model keeps, trained from scratch."""
        total = tasks.dense_weight_count(self.sizes)
        rows = []
        for ratio in self.config.ratios:
            width = dense_width(self.sizes, (1 - ratio) * total)
            sizes = [self.sizes[0]] + [width] * (len(self.sizes) - 2) + [self.sizes[-1]]
            path = self.folder / f"dense_{ratio}.onnx"
            trained = self.train(sizes, path)
            sparsity = 1 - tasks.dense_weight_count(sizes) / total  # weights it does not have
            rows.append(
                _record(self.job, DENSE, ratio, trained, self.finetune(path),
                        sparsity=sparsity, width=width)
            )  # fmt: skip
        return rows


def run_job(job: Job, config: Config) -> tuple[list[dict], dict]:
    import torch

    # One thread per worker: at torch's default (one per core) every small op of compress
    # and finetune waits on a busy sibling core; measured 20x slower on a loaded 2-core box.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="paper_") as tmp:
            runner = JobRunner(job, config, Path(tmp))
            rows = runner.run()
    finally:
        torch.set_num_threads(threads)  # --quick runs in the caller's process (the tests)
    timing = {"job": asdict(job), "seconds": time.perf_counter() - start, **runner.timing}
    return rows, timing


def all_jobs(config: Config) -> list[Job]:
    """Seed by seed, so a run cut short still covers every task and architecture; within
    a seed the biggest first, so two workers finish at about the same time."""
    jobs = [
        Job(task, noise, tuple(hidden), seed)
        for task, noise in config.datasets
        for hidden in config.hidden[task]
        for seed in range(config.seeds)
    ]
    return sorted(jobs, key=lambda j: (j.seed, -j.hidden[0], j.task != "digits"))


def job_file(folder: Path, job: Job) -> Path:
    return folder / f"{job.task}_{job.noise:g}_{arch_label(job.hidden)}_seed{job.seed}.json"


def run_all(config: Config, workers: int, folder: Path) -> tuple[list[dict], list[dict]]:
    """Run the jobs whose result file is not in ``folder`` yet, saving each as it ends (a
    stopped run resumes where it was); returns the rows and timings of all jobs."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = [job for job in all_jobs(config) if not job_file(folder, job).exists()]
    todo = [] if workers == 0 else todo
    if workers <= 1:
        results = (run_job(job, config) for job in todo)
    else:
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
        results = (f.result() for f in as_completed(pool.submit(run_job, j, config) for j in todo))
    for job_rows, timing in results:
        job = Job(**{**timing["job"], "hidden": tuple(timing["job"]["hidden"])})
        job_file(folder, job).write_text(json.dumps({"rows": job_rows, "timing": timing}))
        print(f"done {timing['job']} in {timing['seconds']:.1f} s", flush=True)
    rows, timings = [], []
    for job in all_jobs(config):
        if not job_file(folder, job).exists():  # --report-only before the run has ended
            continue
        saved = json.loads(job_file(folder, job).read_text())
        rows += saved["rows"]
        timings.append(saved["timing"])
    return rows, timings


def machine() -> str:
    import torch

    return (
        f"{platform.processor() or platform.machine()}, {platform.system()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run, for the tests")
    parser.add_argument(
        "--out",
        type=Path,
        help="folder of the results (default: benchmarks/figures; with --quick a new "
        "temporary folder, so a smoke run never replaces the committed figures)",
    )
    parser.add_argument("--workers", type=int, default=2, help="processes (1: in this one)")
    parser.add_argument("--seeds", type=int, help="override the number of seeds")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: render the report from the jobs saved so far",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="discard the saved per-job results of --out"
    )
    args = parser.parse_args(argv)
    args.out = tasks.results_folder(args.out, args.quick, FIGURES, "paper")
    config = QUICK if args.quick else FULL
    if args.seeds:
        config = replace(config, seeds=args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        for saved in (args.out / ("paper_jobs_quick" if args.quick else "paper_jobs")).glob(
            "*.json"
        ):
            saved.unlink()

    start = time.perf_counter()
    jobs_folder = args.out / ("paper_jobs_quick" if args.quick else "paper_jobs")
    workers = 0 if args.report_only else 1 if args.quick else args.workers
    rows, timings = run_all(config, workers, jobs_folder)
    seconds = time.perf_counter() - start
    meta = {
        "command": "python benchmarks/paper.py " + " ".join(argv or sys.argv[1:]),
        "seconds": seconds,
        "machine": machine(),
        "workers": workers,
        "jobs": len(timings),
        "config": {k: v for k, v in asdict(config).items()},
    }
    results = {"meta": meta, "rows": rows, "timings": timings}
    (args.out / "paper_results.json").write_text(json.dumps(results, indent=1, default=str))

    from benchmarks.paper_report import write_report

    write_report(results, args.out)
    print(f"wrote {args.out} in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
