"""Command line: ``db3kd run``, ``db3kd tune``, ``db3kd methods``, ``db3kd leaderboard``.

Heavy libraries (torch, torchvision, mlflow) are imported inside the commands, so ``--help``
answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DATASET_CHOICES = ("digits", "mnist", "fmnist", "cifar10", "cifar100", "flowers102")
PROFILE_CHOICES = ("smoke", "cpu", "paper")


def _parse_override(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key, parsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="db3kd",
        description="Knowledge distillation from black-box teachers that answer only top-1 labels (DB3KD, ICML 2021), "
        "and the methods it is compared with.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="train or load the teacher, build labels through the oracle, train and evaluate a student",
        description="Run one method end to end. With no arguments: DB3KD-BD on scikit-learn's embedded 8x8 digits "
        "(no download), cpu profile, seed 0.",
    )
    run.add_argument("--dataset", default="digits", choices=DATASET_CHOICES,
                     help="dataset (default: digits, embedded, needs no files)")
    run.add_argument("--method", default="db3kd-bd",
                     help="registered method name (default: db3kd-bd); `db3kd methods` lists them")
    run.add_argument("--profile", default="cpu", choices=PROFILE_CHOICES,
                     help="scale: paper = the paper's settings (GPU), cpu = reduced for 2 CPU cores, "
                     "smoke = seconds (default: cpu)")
    run.add_argument("--seed", type=int, default=0, help="random seed for every RNG of the run (default: 0)")
    run.add_argument("--data-root", default=None,
                     help="folder holding the dataset files (default: $DB3KD_DATA, else ./data); "
                     "on these machines MNIST/Fashion-MNIST are in ../shared/datasets")
    run.add_argument("--teacher", default=None, metavar="PATH",
                     help="use your own teacher instead of the built-in one: a TorchScript (torch.jit.save) or "
                     "torch.export (.pt2) model of any architecture, used only through the oracle")
    run.add_argument("--run-dir", default=None, metavar="DIR",
                     help="keep the run in DIR/<config hash>: long stages checkpoint there and a rerun resumes from "
                     "whatever is complete; a finished run is returned without recomputation")
    run.add_argument("--query-budget", type=int, default=None, metavar="N",
                     help="the most teacher queries the method may spend in total; the run stops cleanly when they "
                     "are spent (with --run-dir, finished work is kept and a rerun with a larger budget continues)")
    run.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    run.add_argument("--set", dest="overrides", action="append", default=[], type=_parse_override, metavar="KEY=VALUE",
                     help="override a method hyperparameter, e.g. --set budget=2000 --set tau=0.5 (repeatable)")
    run.add_argument("--params", default="tuned", choices=("tuned", "paper"),
                     help="tuned (default): the values chosen on the validation split in benchmarks/tuned/"
                     "<dataset>-<profile>.json when the method has them; paper: the papers' settings")
    run.add_argument("--student", default=None, metavar="ARCH",
                     help="student architecture instead of the dataset's (e.g. lenet5-1/5, alexnet-quarter)")
    run.add_argument("--teacher-seed", type=int, default=0,
                     help="seed of the built-in teacher, shared by every method and run seed (default: 0)")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of the text summary")
    run.add_argument("--show-config", action="store_true", help="print the fully resolved configuration and exit")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")

    tune = sub.add_parser(
        "tune", help="tune a method's hyperparameters on the validation split (Optuna TPE, resumable)",
        description="Run or resume an Optuna study (TPE, fixed sampler seed, median pruning on the per-epoch "
        "validation accuracy) over the method's declared search space and the student recipe; the objective is "
        "validation accuracy (the test split is not read). The best values go to "
        "benchmarks/tuned/<dataset>-<profile>.json, which `db3kd run` and the benchmarks use by default.")
    tune.add_argument("--dataset", required=True, choices=DATASET_CHOICES)
    tune.add_argument("--method", required=True, help="registered method name")
    tune.add_argument("--trials", type=int, required=True, metavar="N",
                      help="finished trials in all (a resumed study runs only the missing ones)")
    tune.add_argument("--profile", default="cpu", choices=PROFILE_CHOICES, help="default: cpu")
    tune.add_argument("--seed", type=int, default=0, help="run seed of every trial (default: 0)")
    tune.add_argument("--sampler-seed", type=int, default=0, help="seed of the TPE sampler (default: 0)")
    tune.add_argument("--storage", default=None, metavar="URL",
                      help="Optuna RDB storage (default: sqlite:///$DB3KD_CACHE/tuning/<dataset>-<profile>.db)")
    tune.add_argument("--out", default=None, metavar="DIR", help="where the tuned values go (default: benchmarks/tuned)")
    tune.add_argument("--data-root", default=None, help="dataset folder (default: $DB3KD_DATA, else ./data)")
    tune.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    tune.add_argument("--tracking-uri", default=None, metavar="URI",
                      help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    tune.add_argument("--no-tracking", action="store_true", help="do not log the trials to MLflow")

    methods = sub.add_parser("methods", help="list the registered methods (name, teacher access, data, paper)")
    methods.add_argument("--json", action="store_true", help="print a JSON list of objects with keys name, access, data, paper")

    board = sub.add_parser("leaderboard", help="regenerate the leaderboard tables in results/ from the stored records",
                           description="Regenerate every table and plot from the records under RESULTS/records; "
                           "with --from-mlflow, first write the records of the tracked runs there.")
    board.add_argument("--results", default="results", help="results folder (default: results)")
    board.add_argument("--from-mlflow", default=None, metavar="URI", nargs="?", const="",
                       help="take the records from the FINISHED case runs of an MLflow store (record.json of each; "
                       "the latest run per dataset, profile, method and seed), write them under RESULTS/records and "
                       "regenerate the tables of those (dataset, profile) groups; URI default: $MLFLOW_TRACKING_URI, "
                       "else sqlite:///mlflow.db")
    return parser


def _cmd_run(args) -> int:
    import torch

    from db3kd.config import resolve
    from db3kd.runner import run

    config = resolve(args.dataset, args.method, args.profile, args.seed, method_overrides=dict(args.overrides),
                     teacher_file=args.teacher, query_budget=args.query_budget, params=args.params,
                     student_arch=args.student, teacher_seed=args.teacher_seed)
    if args.show_config:
        print(json.dumps(config.to_dict(), indent=2, default=str))
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.json:
        print(f"db3kd run: {config.method} on {config.dataset}, profile {config.profile}, seed {config.seed}, "
              f"config {config.config_hash()}", file=sys.stderr)
    record = run(config, data_root=args.data_root, device=device, run_dir=args.run_dir,
                 progress=not args.no_progress and sys.stderr.isatty())
    keys = ("dataset", "method", "profile", "seed", "teacher_accuracy", "student_accuracy", "queries_total",
            "queries_per_sample", "wall_seconds")
    if args.json:
        print(json.dumps({k: record[k] for k in keys}))
    else:
        print(f"teacher accuracy        {record['teacher_accuracy']:.4f} (checkpoint {record['teacher_checkpoint']})")
        print(f"student accuracy        {record['student_accuracy']:.4f}")
        print(f"queries total           {record['queries_total']}")
        print(f"queries per sample      {record['queries_per_sample']:.1f}")
        print(f"wall time               {record['wall_seconds']:.1f} s")
        for k, v in sorted(record["metrics"].items()):
            print(f"{k:<24}{v:.4g}")
        for k, v in record["milestone_accuracy"].items():
            print(f"accuracy at {k} queries/pair: {v:.4f}")
        if record.get("artifacts"):
            where = record["workdir"] if args.run_dir else f"{record['workdir']} (temporary; --run-dir keeps runs resumable)"
            print(f"artifacts               {where}")
    return 0


def _cmd_tune(args) -> int:
    import torch

    from db3kd.tuning import tune

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    entry = tune(args.dataset, args.method, args.trials, profile=args.profile, seed=args.seed,
                 sampler_seed=args.sampler_seed, storage=args.storage, data_root=args.data_root, device=device,
                 tracking_uri=args.tracking_uri, tracking=not args.no_tracking, out_dir=args.out,
                 progress=sys.stderr.isatty())
    print(f"best validation accuracy {entry['best_val_accuracy']:.4f} (trial {entry['best_trial']}, "
          f"{entry['complete_trials']} complete, {entry['pruned_trials']} pruned of {entry['trials']})")
    print(f"params {json.dumps(entry['params'], sort_keys=True)} student {json.dumps(entry['student'], sort_keys=True)}")
    print(f"written to {entry['path']}")
    return 0


def _cmd_methods(args) -> int:
    from db3kd.registry import method_table

    table = method_table()
    if args.json:
        print(json.dumps(table))
        return 0
    width = max(len(r["name"]) for r in table)
    for r in table:
        print(f"{r['name']:<{width}}  {r['access']:<9}  {r['data']:<8}  {r['paper']}")
    return 0


def _cmd_leaderboard(args) -> int:
    from db3kd.leaderboard import write_all

    only = None
    if args.from_mlflow is not None:
        from db3kd.records import write_record
        from db3kd.tracking import records_from_mlflow

        records = records_from_mlflow(args.from_mlflow or None)
        if not records:
            from db3kd.errors import DB3KDError

            raise DB3KDError(f"no finished case runs with a record.json in MLflow at {args.from_mlflow or 'the default store'}")
        for record in records:
            write_record(record, args.results)
        only = sorted({(r["dataset"], r["profile"]) for r in records})
        print(f"{len(records)} record(s) from MLflow written under {args.results}/records", file=sys.stderr)
    for path in write_all(args.results, only=only):
        print(path)
    return 0


def main(argv=None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # e.g. `db3kd leaderboard | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from db3kd.errors import DB3KDError, QueryBudgetExceeded

    try:
        return {"run": _cmd_run, "tune": _cmd_tune, "methods": _cmd_methods,
                "leaderboard": _cmd_leaderboard}[args.command](args)
    except QueryBudgetExceeded as exc:
        print(f"db3kd: stopped cleanly after {exc.queries} teacher queries: {exc}", file=sys.stderr)
        if getattr(args, "run_dir", None):
            print(f"db3kd: finished stages are kept in {args.run_dir}; rerun to continue", file=sys.stderr)
        return 3
    except DB3KDError as exc:
        print(f"db3kd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
