"""The `cxr` command: parse arguments, load params, run a flow, turn bad data into a message.

Business logic lives in `tasks/`; composition in `flows/`. Here a `DataError` becomes one
paragraph on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import textwrap
from pathlib import Path

from cxr.core.errors import DataError
from cxr.core.labels import STAGES


def _is_disk_full(exc: BaseException | None) -> bool:
    # pyarrow raises a plain OSError without errno, naming the cause only in its text.
    return isinstance(exc, OSError) and (exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(exc))


class _QuietDataErrors(logging.Filter):
    """Drop the traceback from Prefect's log records of bad data or a full disk: neither is a bug."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, DataError) or _is_disk_full(exc):
            record.exc_info = None
            record.exc_text = None
            record.msg = f"{record.getMessage().splitlines()[0]} {exc}"
            record.args = ()
        return True


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _OnlyFrom(logging.Filter):
    """Keep Prefect's own records (run lines, engine messages) off a handler below `level`, and
    the project's progress lines below WARNING (epochs, chunks, batches: they go to the Prefect
    run logs) unless `level` asks for them."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "cxr" or record.name.startswith("cxr."):
            return record.levelno >= min(self.level, logging.WARNING)
        return not record.name.startswith("prefect") or record.levelno >= self.level


def _quiet_prefect_tracebacks() -> None:
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.engine"):
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            handler.addFilter(_QuietDataErrors())
        logger.addFilter(_QuietDataErrors())


def _terminal_logging(verbose: bool, level: str | None) -> None:
    """What of Prefect's logging reaches the terminal.

    By default none of Prefect's run lines do: a failed task, its flow and the flow's final
    state would each repeat a data error that the CLI prints once, as one paragraph. Prefect's
    API handler is untouched, so runs against a server still show every line (and the failure
    with its message) in the UI. `--verbose` shows them from INFO, `--log-level` from a level.
    """
    shown = logging.getLevelName(level) if level else (logging.INFO if verbose else logging.CRITICAL + 1)
    if level or verbose:
        for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).setLevel(shown)
    for handler in logging.getLogger().handlers:  # Prefect's console handler sits on the root logger
        handler.addFilter(_OnlyFrom(shown))


def _add_common_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # The same options before or after the subcommand (`cxr --params F split` = `cxr split --params F`).
    # Subcommands default to SUPPRESS so an option given before the subcommand is not overwritten.
    default = (lambda value: value) if top else (lambda value: argparse.SUPPRESS)
    parser.add_argument("--params", default=default("params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("--verbose", "-v", action="store_true", default=default(False),
                        help="also show Prefect's per-flow and per-task log lines (INFO) on the terminal")
    parser.add_argument("--log-level", choices=LOG_LEVELS, type=str.upper, default=default(None),
                        help="show Prefect's run log lines on the terminal from this level on")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr", description="AG-CNN on NIH ChestX-ray14: data, training and batch scoring.")
    _add_common_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="render synthetic radiographs for a patient sample of the real NIH metadata")
    p.add_argument("--metadata", type=Path, help="NIH Data_Entry CSV to sample (default: the one packaged with torchxrayvision)")
    p.add_argument("--out", type=Path, help="output folder (default: paths.raw)")

    p = sub.add_parser("ingest", help="read, validate (Great Expectations) and write metadata.parquet")
    p.add_argument("--metadata", type=Path, required=True, help="NIH Data_Entry CSV (2017 or v2020 header)")
    p.add_argument("--out", type=Path, help="output folder (default: paths.interim)")

    p = sub.add_parser("split", help="patient-level split, leakage gate and class weights")
    p.add_argument("--metadata", type=Path, help="metadata.parquet (default: paths.interim/metadata.parquet)")
    p.add_argument("--out", type=Path, help="output folder (default: paths.processed)")
    p.add_argument("--assignments", type=Path, help="external split CSV (Image Index, split) to check and use instead")

    p = sub.add_parser("train", help="train one AG-CNN stage (global, then local, then fusion)")
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes (DistributedDataParallel; gloo on CPU, NCCL on GPU)")

    sub.add_parser("evaluate", help="test-split AUROC (global, local, fusion), bootstrap CIs, ROC points, localization IoU")

    p = sub.add_parser("score", help="score new studies (PNG, JPEG, DICOM) into scores.parquet, JSON, overlays and an HTML report")
    p.add_argument("--input", type=Path, help="folder of studies to score (searched recursively)")
    p.add_argument("--out", type=Path, help="output folder (default: paths.reports/scoring)")
    p.add_argument("--dicomweb", metavar="URL", help="instead of --input: a PACS's DICOMweb root (credentials from "
                   "CXR_DICOMWEB_USER/CXR_DICOMWEB_PASSWORD or CXR_DICOMWEB_TOKEN); new chest CR/DX instances are "
                   "scored and, unless score.write_back is false, the results stored back as DICOM SR + SC")
    p.add_argument("--since", metavar="YYYY-MM-DD", help="with --dicomweb: studies from this date (default: the "
                   "last run's watermark less source.lookback_days; every study the first time)")

    p = sub.add_parser("receive", help="DICOM C-STORE receiver (pynetdicom): each received image is written into paths.incoming")
    p.add_argument("--port", type=int, default=11112, help="DICOM port (default 11112)")
    p.add_argument("--ae-title", default="CXR", help="this receiver's AE title (default CXR)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback)")

    p = sub.add_parser("cache", help="build the image cache (decode once) or the crop cache (after stage I)")
    p.add_argument("what", choices=("images", "crops"))

    p = sub.add_parser("models", help="the registered model bundles: list, show one, promote one to current (rollback), refit thresholds")
    p.add_argument("action", choices=("list", "show", "promote", "thresholds"))
    p.add_argument("digest", nargs="?", help="a bundle's digest or a unique prefix (show: default current)")

    sub.add_parser("backbones", help="list the backbones as JSON: feature size, parameters, whether ImageNet weights are on this machine (offline)")
    sub.add_parser("serve", help="serve the nightly-scoring Prefect deployment (cron from params; runs until stopped)")
    sub.add_parser("alerts", help="make or update the Prefect automation that POSTs to params nightly.alert_webhook "
                   "when a nightly-scoring run fails or crashes")

    p = sub.add_parser("app", help="the local web app: upload page, study pages, runs browser and JSON API (loopback by default)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs CXR_APP_TOKEN)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")

    p = sub.add_parser("pipeline", help="run the whole DAG in one flow run: data, caches, three stages, evaluation")
    p.add_argument("--metadata", type=Path, help="NIH Data_Entry CSV (default: params data.metadata, else synthesize the demo data)")
    for p in sub.choices.values():
        _add_common_options(p, top=False)
    return parser


def _run(args: argparse.Namespace) -> dict | list:
    if args.command == "backbones":  # needs no params and no Prefect: the models alone
        from models.branch import backbone_catalog

        return backbone_catalog()
    from cxr.core.config import load_params

    params = load_params(args.params)
    paths = params.paths
    if args.command == "models":  # the bundles are files: no Prefect run
        return _models(args, params)
    if args.command == "receive":  # a DIMSE listener: no Prefect run
        from tasks.scoring.receive import serve_receiver

        serve_receiver(paths.incoming, host=args.host, port=args.port, ae_title=args.ae_title)
        return {"served": "receive", "host": args.host, "port": args.port}
    if args.command == "score":
        if bool(args.input) == bool(args.dicomweb):
            raise DataError("give exactly one of --input FOLDER or --dicomweb URL")
        if args.since and not args.dicomweb:
            raise DataError("--since applies to --dicomweb only")
        if args.since:
            import datetime as _dt

            try:
                _dt.date.fromisoformat(args.since)
            except ValueError:
                raise DataError("--since must be a date YYYY-MM-DD") from None
    if args.command == "app":
        import os

        from app.security import TOKEN_ENV, check_bind

        # Refused before anything heavy loads: another address than loopback needs the token.
        check_bind(args.host, os.environ.get(TOKEN_ENV) or None)
        # The app never runs a flow: no Prefect import, the model loads once and serves until stopped.
        from app.main import serve as serve_app

        serve_app(params, args.host, args.port)
        return {"served": "app", "host": args.host, "port": args.port}
    if args.command in ("ingest", "split"):
        # Bad input is refused before Prefect is imported or a server started: the same gate
        # the run applies (the run then reuses its verdict).
        _check_input(args, params)
    if args.command == "score" and args.dicomweb:
        # A stopped PACS or refused credentials are said before Prefect starts (seconds).
        from tasks.scoring.dicomweb import DicomWebSource, credentials_to_env, scrub_url

        credentials_to_env(args.dicomweb)
        DicomWebSource(scrub_url(args.dicomweb)).check()
    # Prefect is imported only once arguments, params and inputs are known good: it costs seconds.
    from flows import data

    _quiet_prefect_tracebacks()
    _terminal_logging(args.verbose, args.log_level)
    if args.command == "synth":
        from tasks.metadata.ingest import packaged_metadata_path

        return data.synth_flow(params, args.metadata or packaged_metadata_path(), args.out or paths.raw)
    if args.command in ("ingest", "split"):
        return _input_flow(args, params, check_only=False)
    if args.command in ("train", "evaluate"):
        from flows import train
    if args.command == "train":
        summary = train.train_flow(params, args.stage, nproc=args.nproc)
        return {k: v for k, v in summary.items() if k != "history"}
    if args.command == "evaluate":
        report = train.evaluate_flow(params)
        return {"model_digest": report["model_digest"], "test_images": report["test_images"],
                **{f"{b}_mean_auroc": v["mean_auroc"] for b, v in report["branches"].items()},
                "localization": report["localization"],
                "fusion_ece": {k: v["pooled"] for k, v in report["calibration"]["ece"].items()},
                "ood_marked": (report.get("ood") or {}).get("honest_mark"),
                "figures": str(Path(paths.reports) / "figures"), "model_card": str(Path(paths.reports) / "model_card.md")}
    if args.command == "score" and args.dicomweb:
        import datetime as _dt

        from flows.pacs import pacs_scoring_flow
        from tasks.scoring.dicomweb import scrub_url

        since = _dt.date.fromisoformat(args.since) if args.since else None
        # The flow (and the Prefect UI) sees the URL without credentials; the source reads them
        # from the environment (user:password@ in the URL moved there above, in this process only).
        return pacs_scoring_flow(params, scrub_url(args.dicomweb), args.out or paths.reports / "scoring", since)
    if args.command == "score":
        from flows.score import score, terminal_progress

        with terminal_progress("score"):  # a tqdm bar on a terminal's stderr; none when piped
            return score(params, args.input, args.out or paths.reports / "scoring")
    if args.command == "cache":
        from flows.cache import cache_crops, cache_images

        return (cache_images if args.what == "images" else cache_crops)(params)
    if args.command == "alerts":
        from flows.alerts import ensure_nightly_alert

        return ensure_nightly_alert(params.nightly.alert_webhook).summary()
    if args.command == "serve":
        from flows.nightly import serve

        serve(args.params)
        return {"served": "nightly-scoring"}
    if args.command == "pipeline":
        from flows.pipeline import pipeline_flow

        if args.metadata:
            # The flag is params `data.metadata` given on the command line: evaluation then knows
            # the images are real (NIH's lesion boxes apply to them).
            params = params.model_copy(update={"data": params.data.model_copy(update={"metadata": args.metadata.resolve()})})
        return pipeline_flow(params)
    raise AssertionError(args.command)


def _input_flow(args: argparse.Namespace, params, check_only: bool):
    """The ingest or split of `args`: checked only (no Prefect), or as its Prefect flow."""
    paths = params.paths
    if args.command == "ingest":
        if check_only:
            from tasks.metadata.ingest import run_ingest

            return run_ingest(args.metadata, args.out or paths.interim, check_only=True)
        from flows import data

        return data.ingest_flow(args.metadata, args.out or paths.interim)
    metadata = args.metadata or paths.interim / "metadata.parquet"
    if check_only:
        from tasks.metadata.split import run_split

        return run_split(metadata, args.out or paths.processed, ratios=params.split.ratios(),
                         tolerance=params.split.tolerance, seed=params.seed, assignments=args.assignments,
                         check_only=True)
    from flows import data

    return data.split_flow(params, metadata, args.out or paths.processed, args.assignments)


def _check_input(args: argparse.Namespace, params) -> None:
    """Refuse a bad metadata or split input before any Prefect work. With a Prefect server
    configured, the refusal is said at once and then also recorded as a failed run in its UI."""
    try:
        _input_flow(args, params, check_only=True)
    except DataError as exc:
        if not os.environ.get("PREFECT_API_URL"):
            raise
        _say(args, exc)
        from flows import data  # noqa: F401  (Prefect sets up its logging on import: before ours)

        _quiet_prefect_tracebacks()
        _terminal_logging(args.verbose, args.log_level)
        try:
            _input_flow(args, params, check_only=False)  # fails the same way, now as a run in the UI
        except DataError:
            pass
        exc.said = True
        raise


def _say(args: argparse.Namespace, exc: DataError) -> None:
    message = str(exc)
    # Wrap for a person at a terminal only: piped into a log, the error stays one line, so
    # grep finds it whole and its wording does not depend on how long the paths are.
    if sys.stderr.isatty():
        message = textwrap.fill(message, width=100, break_long_words=False, break_on_hyphens=False)
    print(f"cxr {args.command}: error: {message}", file=sys.stderr, flush=True)


def _models(args: argparse.Namespace, params) -> dict | list:
    from tasks.bundle.registry import list_bundles, load_bundle, promote

    models_dir = params.paths.models
    if args.action == "list":
        return list_bundles(models_dir)
    if args.action in ("promote", "thresholds") and not args.digest:
        raise DataError(f"`cxr models {args.action}` needs the digest (or a unique prefix) of a registered bundle")
    if args.action == "show":
        return load_bundle(models_dir, args.digest).summary()
    if args.action == "promote":
        return {"current": promote(models_dir, args.digest).digest}
    from tasks.training.registration import refit_thresholds  # needs the validation split

    bundle = refit_thresholds(params, args.digest)
    return {"digest": bundle.digest, "thresholds": sorted(bundle.manifest["thresholds"])}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # No telemetry from an ephemeral Prefect server: this machine may have no network, and a
    # failed send would print an error line into the user's terminal.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    try:
        result = _run(args)
    except DataError as exc:
        if not getattr(exc, "said", False):  # printed once
            _say(args, exc)
        return exc.exit_code
    except OSError as exc:
        if not _is_disk_full(exc):
            raise
        # Every writer goes through cxr.atomic: the temporary file is gone and the previous
        # output is untouched, so saying so is accurate.
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"cxr {args.command}: error: the disk is full{where} ({exc.strerror}); nothing was "
              "replaced: the previous outputs are intact. Free some space and run the command again.", file=sys.stderr)
        return 3
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
