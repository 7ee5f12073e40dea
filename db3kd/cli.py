"""Command line: ``db3kd run``, ``db3kd methods``, ``db3kd leaderboard``.

Heavy libraries (torch, torchvision, mlflow) are imported inside the commands, so ``--help``
answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

PROFILE_CHOICES = ("smoke", "cpu", "paper")
RUN_DEFAULTS = {"dataset": "digits", "method": "db3kd-bd", "profile": "cpu", "seed": 0}


def dataset_choices() -> list[str]:
    """The registered datasets (:mod:`db3kd.datasets`, no heavy imports)."""
    from db3kd.datasets import dataset_names

    return dataset_names()


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
    _add_run(sub)
    _add_tune(sub)
    _add_methods(sub)
    _add_leaderboard(sub)
    return parser


def _add_run(sub) -> argparse.ArgumentParser:
    run = sub.add_parser(
        "run",
        help="train or load the teacher, build labels through the oracle, train and evaluate a student",
        description="Run one method end to end. With no arguments: DB3KD-BD on scikit-learn's embedded 8x8 digits "
        "(no download), cpu profile, seed 0. Every setting of the resolved configuration can be changed with "
        "--set KEY=VALUE or a --config FILE.yaml (what --show-config prints); explicit options win over --set, "
        "which wins over --config.",
    )
    run.add_argument("--dataset", default=None, choices=dataset_choices(),
                     help="dataset (default: digits, embedded, needs no files)")
    run.add_argument("--method", default=None,
                     help="registered method name (default: db3kd-bd); `db3kd methods` lists them")
    run.add_argument("--profile", default=None, choices=PROFILE_CHOICES,
                     help="scale: paper = the paper's settings (GPU), cpu = reduced for 2 CPU cores, "
                     "smoke = seconds (default: cpu)")
    run.add_argument("--seed", type=int, default=None, help="random seed for every RNG of the run (default: 0)")
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
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="change any setting of the resolved configuration (repeatable): method parameters "
                     "(tau=0.5, budget=2000, or params.tau=0.5), stage settings (student.epochs=5, teacher.arch=lenet5, "
                     "student.train_subset=null, student.lr=1e-3), run settings (val_fraction=0.2, oracle_batch=512, "
                     "query_budget=10000); values are YAML scalars")
    run.add_argument("--config", default=None, metavar="FILE.yaml",
                     help="load settings from a YAML file with the same keys (what --show-config prints loads back "
                     "unchanged)")
    run.add_argument("--variant", default=None, metavar="NAME",
                     help="name this configuration in records, leaderboards and MLflow (default: 'default' for the "
                     "default configuration, else the hash of what differs from it)")
    _add_ray_options(run)
    run.add_argument("--params", default="tuned", choices=("tuned", "paper"),
                     help="tuned (default): the values chosen on the validation split in benchmarks/tuned/"
                     "<dataset>-<profile>.json when the method has them; paper: the papers' settings")
    run.add_argument("--student", default=None, metavar="ARCH",
                     help="student architecture instead of the dataset's (e.g. lenet5-1/5, alexnet-quarter; "
                     "the same as --set student.arch=...); the teacher's own seed is --set teacher_seed=N")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of the text summary")
    run.add_argument("--show-config", action="store_true",
                     help="print the fully resolved configuration as YAML (loadable with --config) and exit")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--record", action="store_true",
                     help="write the run's record under RESULTS/records/ (as a benchmark case does; "
                     "`db3kd leaderboard` tables it) and track it in MLflow unless --no-tracking")
    run.add_argument("--results", default="results", metavar="RESULTS",
                     help="results folder for --record (default: results)")
    run.add_argument("--tracking-uri", default=None, metavar="URI",
                     help="MLflow store for --record (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    run.add_argument("--no-tracking", action="store_true", help="with --record: do not log to MLflow")
    return run


def _add_tune(sub) -> argparse.ArgumentParser:
    tune = sub.add_parser(
        "tune", help="tune a method's hyperparameters on the validation split (Optuna TPE, resumable)",
        description="Run or resume an Optuna study (TPE, fixed sampler seed, median pruning on the per-epoch "
        "validation accuracy) over the method's declared search space and the student recipe; the objective is "
        "validation accuracy (the test split is not read). The best values go to "
        "benchmarks/tuned/<dataset>-<profile>.json, which `db3kd run` and the benchmarks use by default.")
    tune.add_argument("--dataset", required=True, choices=dataset_choices())
    tune.add_argument("--method", required=True, help="registered method name")
    tune.add_argument("--trials", type=int, required=True, metavar="N",
                      help="finished sampler trials in all (a resumed study runs only the missing ones); "
                           "the profile's defaults are scored once on top, see --no-defaults-trial")
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
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="a setting held fixed in every trial, as in db3kd run (e.g. --set per_class=1000); the "
                           "study is stored as METHOD@KEY=VALUE,... and no run applies it by default: pass its values "
                           "to db3kd run with --set")
    tune.add_argument("--no-defaults-trial", action="store_true",
                      help="do not score the profile's defaults as an extra trial (then the chosen values "
                           "can be worse on validation than the defaults)")
    return tune


def _cmd_tune(args) -> int:
    import torch

    from db3kd.config import parse_set
    from db3kd.tuning import tune

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    entry = tune(args.dataset, args.method, args.trials, profile=args.profile, seed=args.seed, settings=parse_set(args.overrides),
                 sampler_seed=args.sampler_seed, storage=args.storage, data_root=args.data_root, device=device,
                 tracking_uri=args.tracking_uri, tracking=not args.no_tracking, out_dir=args.out,
                 progress=sys.stderr.isatty(), defaults_trial=not args.no_defaults_trial)
    defaults = entry.get("defaults_trial")
    if defaults:
        score = "pruned" if defaults["val_accuracy"] is None else f"{defaults['val_accuracy']:.4f}"
        print(f"defaults (trial {defaults['number']}): validation accuracy {score}")
    print(f"best validation accuracy {entry['best_val_accuracy']:.4f} (trial {entry['best_trial']}, "
          f"{entry['complete_trials']} complete, {entry['pruned_trials']} pruned of {entry['trials']})")
    print(f"params {json.dumps(entry['params'], sort_keys=True)} student {json.dumps(entry['student'], sort_keys=True)}")
    print(f"written to {entry['path']}")
    return 0


def _add_methods(sub) -> argparse.ArgumentParser:
    methods = sub.add_parser("methods", help="list the registered methods with their parameters and defaults",
                             description="List the registered methods (name, teacher access, data, paper) with "
                             "every parameter's paper default; with NAME, one method in detail (types, rules, "
                             "per-profile values). Change a parameter with db3kd run --set NAME=VALUE.")
    methods.add_argument("name", nargs="?", default=None, help="one method (default: all)")
    methods.add_argument("--json", action="store_true",
                         help="print a JSON list of objects with keys name, access, data, paper, params, "
                         "profile_overrides")
    return methods


def _add_leaderboard(sub) -> argparse.ArgumentParser:
    board = sub.add_parser("leaderboard", help="regenerate the leaderboard tables in results/ from the stored records",
                           description="Regenerate every table and plot from the records under RESULTS/records; "
                           "with --from-mlflow, first write the records of the tracked runs there.")
    board.add_argument("--results", default="results", help="results folder (default: results)")
    board.add_argument("--from-mlflow", default=None, metavar="URI", nargs="?", const="",
                       help="take the records from the FINISHED case runs of an MLflow store (record.json of each; "
                       "the latest run per dataset, profile, method, variant and seed), write them under "
                       "RESULTS/records and regenerate the tables of those (dataset, profile) groups; URI default: "
                       "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    return board


def config_from_args(args):
    """The RunConfig of ``db3kd run``'s arguments: --config file, then --set, then explicit options."""
    from db3kd.config import load_config_file, parse_set, resolve

    settings = load_config_file(args.config) if args.config else {}
    settings.update(parse_set(args.overrides))
    ident = {}
    for key, default in RUN_DEFAULTS.items():
        value = settings.pop(key, default)
        ident[key] = getattr(args, key) if getattr(args, key) is not None else value
    variant = args.variant if args.variant is not None else settings.pop("variant", None)
    settings.pop("variant", None)
    return resolve(ident["dataset"], ident["method"], ident["profile"], ident["seed"], overrides=settings,
                   teacher_file=args.teacher, query_budget=args.query_budget, variant=variant, params=args.params,
                   student_arch=args.student)


def _cmd_run(args) -> int:
    from db3kd.config import describe_diff

    config = config_from_args(args)
    if args.show_config:
        from db3kd.config import dump_config

        sys.stdout.write(dump_config(config))
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    diff = describe_diff(_diff(config))
    if not args.json:
        print(f"db3kd run: {config.method} on {config.dataset}, profile {config.profile}, seed {config.seed}, "
              f"config {config.config_hash()}, variant {config.variant}" + (f" ({diff})" if diff else ""),
              file=sys.stderr)
    progress = not args.no_progress and sys.stderr.isatty()
    executor = _executor(args)
    if executor is not None and not args.json:
        print(f"db3kd run: label construction as chunk tasks on the {executor.describe()}", file=sys.stderr)
    if args.record:
        record = _recorded_run(args, config, device, progress, executor)
    else:
        from db3kd.runner import run

        record = run(config, data_root=args.data_root, device=device, run_dir=args.run_dir, progress=progress,
                     executor=executor)
    keys = ("dataset", "method", "profile", "seed", "teacher_accuracy", "student_accuracy", "queries_total",
            "queries_sent", "queries_per_sample", "soft_label_sha256", "wall_seconds", "config_hash")
    if args.json:  # .get: records written before a key existed
        print(json.dumps({**{k: record.get(k) for k in keys}, "variant": config.variant}))
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
        if record.get("artifacts") and record.get("workdir"):
            where = record["workdir"] if args.run_dir else f"{record['workdir']} (temporary; --run-dir keeps runs resumable)"
            print(f"artifacts               {where}")
        if record.get("record_path"):
            print(f"record                  {record['record_path']} (`db3kd leaderboard --results {args.results}` "
                  "tables it)")
        if record.get("mlflow_run_id"):
            print(f"MLflow run              {record['mlflow_run_id']} in {record['mlflow_tracking_uri']}")
    return 0


def _diff(config) -> dict:
    from db3kd.config import config_diff

    return config_diff(config)


def _recorded_run(args, config, device: str, progress: bool, executor=None) -> dict:
    """``db3kd run --record``: the benchmark harness's code path (:func:`db3kd.tracking.tracked_run`)."""
    from db3kd.datasets import get_dataset
    from db3kd.records import command_line
    from db3kd.tracking import Tracker, new_session_id, tracked_run

    data_root = None
    if get_dataset(config.dataset).needs_files:
        from db3kd.data import resolve_data_root

        data_root = str(resolve_data_root(args.data_root))
    command = ("uv run " if os.environ.get("UV_RUN_RECURSION_DEPTH") else "") + command_line(["db3kd", *args.argv])
    session = new_session_id()
    tracker = Tracker(args.tracking_uri, enabled=not args.no_tracking, session_id=session,
                      session_name=f"db3kd run {session}", session_tags={"profile": config.profile, "command": command})
    status = "FAILED"
    try:
        record = tracked_run(config, tracker, results_dir=args.results,
                             enrich={"command": command, "data_root": data_root},
                             data_root=args.data_root, device=device, run_dir=args.run_dir, progress=progress,
                             executor=executor)
        status = "FINISHED"
    finally:
        tracker.finish_session([config.dataset], status)
    return record


def _cmd_methods(args) -> int:
    from db3kd.registry import method_listing

    table = method_listing()
    if args.name is not None:
        table = [r for r in table if r["name"] == args.name]
        if not table:
            from db3kd.errors import ConfigError

            names = ", ".join(r["name"] for r in method_listing())
            raise ConfigError(f"unknown method {args.name!r}; valid methods: {names}")
    if args.json:
        print(json.dumps(table))
        return 0
    if args.name is not None:
        _print_method(table[0])
        return 0
    width = max(len(r["name"]) for r in table)
    print(f"{len(table)} methods; parameters at their paper defaults (change with db3kd run --set NAME=VALUE; "
          "`db3kd methods NAME` shows types, rules and per-profile values)")
    print(f"{'method':<{width}}  {'access':<9}  {'data':<8}  paper")
    for r in table:
        print(f"{r['name']:<{width}}  {r['access']:<9}  {r['data']:<8}  {r['paper']}")
        params = "  ".join(f"{p['name']}={_fmt(p['default'], p['required'])}" for p in r["params"])
        print(f"{'':<{width}}  {params or '(no parameters)'}")
    return 0


def _fmt(value, required: bool = False) -> str:
    if required:
        return "<required>"
    return value if isinstance(value, str) else json.dumps(value)


def _print_method(r: dict) -> None:
    print(f"{r['name']}: teacher access {r['access']}, data {r['data']}")
    print(f"paper: {r['paper']}")
    if not r["params"]:
        print("parameters: none")
    else:
        rows = [(p["name"], p["type"], _fmt(p["default"], p["required"]), p["rule"]) for p in r["params"]]
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(("parameter", "type", "default", "rule"))]
        print("  ".join(h.ljust(w) for h, w in zip(("parameter", "type", "default", "rule"), widths)).rstrip())
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    for key, values in r.get("profile_overrides", {}).items():
        print(f"profile {key}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))


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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as typed, for records
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
