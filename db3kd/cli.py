"""Command line: ``db3kd run``, ``db3kd methods``, ``db3kd leaderboard``.

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


# --- distributed label construction (issue 17): db3kd.distributed, Ray imported only when used ---
def _add_ray_options(parser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--workers", type=int, default=None, metavar="N",
                       help="split label construction (BD, MBD, ZSDB3KD generation and labelling) into chunk tasks on "
                       "a local Ray cluster of N workers (one GPU per task when there are GPUs); same result as without")
    group.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="run the chunk tasks on an existing Ray cluster (ADDR as printed by `ray start --head`, or "
                       "auto); on several machines give a --run-dir on shared storage")


def _executor(args):
    """The ChunkExecutor that --workers / --ray-address ask for (None: in-process)."""
    if args.workers is None and args.ray_address is None:
        return None
    if args.workers is not None and args.workers < 1:
        from db3kd.errors import ConfigError

        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    from db3kd.distributed import RayExecutor

    return RayExecutor(workers=args.workers, address=args.ray_address,
                       progress=not args.no_progress and sys.stderr.isatty())
# --- end of the distributed options ------------------------------------------------------------


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
                     "whatever is complete; a finished run is returned without recomputation. With --ray-address on "
                     "several machines, DIR must be shared storage (NFS or similar) mounted at the same path on every "
                     "node: the workers write their chunk files there")
    run.add_argument("--query-budget", type=int, default=None, metavar="N",
                     help="the most teacher queries the method may spend in total; the run stops cleanly when they "
                     "are spent (with --run-dir, finished work is kept and a rerun with a larger budget continues)")
    run.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    run.add_argument("--set", dest="overrides", action="append", default=[], type=_parse_override, metavar="KEY=VALUE",
                     help="override a method hyperparameter, e.g. --set budget=2000 --set tau=0.5 (repeatable)")
    _add_ray_options(run)
    run.add_argument("--json", action="store_true", help="print one JSON object instead of the text summary")
    run.add_argument("--show-config", action="store_true", help="print the fully resolved configuration and exit")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")

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
                     teacher_file=args.teacher, query_budget=args.query_budget)
    if args.show_config:
        print(json.dumps(config.to_dict(), indent=2, default=str))
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.json:
        print(f"db3kd run: {config.method} on {config.dataset}, profile {config.profile}, seed {config.seed}, "
              f"config {config.config_hash()}", file=sys.stderr)
    executor = _executor(args)
    if executor is not None and not args.json:
        print(f"db3kd run: label construction as chunk tasks on the {executor.describe()}", file=sys.stderr)
    record = run(config, data_root=args.data_root, device=device, run_dir=args.run_dir,
                 progress=not args.no_progress and sys.stderr.isatty(), executor=executor)
    keys = ("dataset", "method", "profile", "seed", "teacher_accuracy", "student_accuracy", "queries_total",
            "queries_sent", "queries_per_sample", "soft_label_sha256", "wall_seconds")
    if args.json:
        print(json.dumps({k: record.get(k) for k in keys}))  # .get: records written before a key existed
    else:
        print(f"teacher accuracy        {record['teacher_accuracy']:.4f} (checkpoint {record['teacher_checkpoint']})")
        print(f"student accuracy        {record['student_accuracy']:.4f}")
        print(f"queries total           {record['queries_total']}")
        print(f"queries sent            {record.get('queries_sent')} (every query sent, lost work included)")
        print(f"queries per sample      {record['queries_per_sample']:.1f}")
        if record.get("soft_label_sha256"):
            print(f"soft labels sha256      {record['soft_label_sha256']}")
        print(f"wall time               {record['wall_seconds']:.1f} s")
        for k, v in sorted(record["metrics"].items()):
            print(f"{k:<24}{v:.4g}")
        for k, v in record["milestone_accuracy"].items():
            print(f"accuracy at {k} queries/pair: {v:.4f}")
        if record.get("artifacts"):
            where = record["workdir"] if args.run_dir else f"{record['workdir']} (temporary; --run-dir keeps runs resumable)"
            print(f"artifacts               {where}")
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
        return {"run": _cmd_run, "methods": _cmd_methods, "leaderboard": _cmd_leaderboard}[args.command](args)
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
