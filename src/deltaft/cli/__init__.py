"""The ``deltaft`` command: ``train``, ``attention``, ``eval``, ``layers``, ``compare``, ``demo``,
``split``.

This is the only module that configures logging, threads, devices and the process group. Printing
to stdout happens here and in the ``_run`` function of each subcommand module (``compare``,
``demo``, ``split``); the library functions they call return values and log. User errors
(:class:`~deltaft.app.errors.UserError` and the library's ``ValueError`` s) end with exit status 2
and one line on stderr, ``deltaft: error: ...``; a diverged training with status 1; ``--debug``
shows the traceback instead.

Examples::

    deltaft layers --model resnet50
    deltaft train --data birds/ --model resnet50 --method delta --out runs/birds-delta
    deltaft train --out runs/birds-delta --resume
    deltaft eval --run runs/birds-delta --split test
    deltaft split 256_ObjectCategories data/caltech256-30 --train-per-class 30 \\
        --test-per-class 20 --exclude 257.clutter
    torchrun --nproc_per_node 4 -m deltaft train --config configs/paper.yaml --data birds/ ...
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import torch

from deltaft import __version__
from deltaft.app import distributed
from deltaft.app.config import TrainConfig, load_config
from deltaft.app.errors import SettingError, UserError
from deltaft.app.tracking import RunDir
from deltaft.engine import NonFiniteLossError, Progress
from deltaft.objective import METHODS

__all__ = [
    "ProgressPrinter",
    "add_train_arguments",
    "build_parser",
    "config_from_args",
    "main",
]

logger = logging.getLogger("deltaft")

PROG = "deltaft"
_HANDLER_TAG = "_deltaft_cli_handler"


# ------------------------------------------------------------------------------------------------
# Console output: log lines and a progress bar sharing stderr
# ------------------------------------------------------------------------------------------------
class _Console:
    """Tracks whether a progress bar occupies the current stderr line."""

    bar_active = False

    @classmethod
    def clear_bar(cls, stream: TextIO) -> None:
        if cls.bar_active:
            stream.write("\r\033[K")
            cls.bar_active = False


class _StderrHandler(logging.StreamHandler):
    """Writes to the *current* ``sys.stderr`` (so captured streams work), above any bar."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        _Console.clear_bar(self.stream)
        super().emit(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{PROG}: {record.levelname.lower()}: {message}"
        return message


def _configure_logging(level: int) -> None:
    """One handler on the ``deltaft`` logger (replacing an earlier one of this function)."""
    for handler in list(logger.handlers):
        if getattr(handler, _HANDLER_TAG, False):
            logger.removeHandler(handler)
    handler = _StderrHandler()
    setattr(handler, _HANDLER_TAG, True)
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(level)


def _duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressPrinter:
    """Prints training progress to stderr: a live bar on a terminal, plain lines elsewhere.

    Args:
        stream: where to write; default the current ``sys.stderr``.
        every: in plain mode, print every ``every`` steps (and at the end of each epoch).
        tty: force bar (``True``) or plain (``False``) mode; default ``stream.isatty()``.
        min_interval: in bar mode, redraw at most this often (seconds).
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        every: int = 20,
        tty: bool | None = None,
        min_interval: float = 0.1,
    ) -> None:
        self._stream = stream
        self.every = max(int(every), 1)
        self._tty = tty
        self.min_interval = min_interval
        self._last_draw = 0.0

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def tty(self) -> bool:
        if self._tty is not None:
            return self._tty
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    @staticmethod
    def format(p: Progress, *, bar_width: int = 0) -> str:
        """One progress line: epoch, step, running loss parts, accuracy, speed, lr, ETA."""
        parts = [f"{k} {v:.4g}" for k, v in p.metrics.items() if k != "acc"]
        if "acc" in p.metrics:
            parts.append(f"acc {100 * p.metrics['acc']:.1f}%")
        where = f"epoch {p.epoch}/{p.epochs} step {p.step}/{p.steps}"
        if bar_width:
            filled = round(bar_width * p.step / max(p.steps, 1))
            where = (
                f"epoch {p.epoch}/{p.epochs} [{'#' * filled}{'.' * (bar_width - filled)}] "
                f"{p.step}/{p.steps}"
            )
        return (
            f"{where} | {', '.join(parts)} | {p.images_per_s:.1f} img/s | lr {p.lr:.3g} | "
            f"ETA {_duration(p.eta_s)}"
        )

    def __call__(self, p: Progress) -> None:
        end = p.step >= p.steps
        if self.tty:
            now = time.monotonic()
            if not end and now - self._last_draw < self.min_interval:
                return
            self._last_draw = now
            width = shutil.get_terminal_size((100, 20)).columns
            line = self.format(p, bar_width=20)[: max(width - 1, 20)]
            self.stream.write("\r\033[K" + line + ("\n" if end else ""))
            _Console.bar_active = not end
        elif end or p.step % self.every == 0:
            self.stream.write(self.format(p) + "\n")
        self.stream.flush()


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------
class _UsageError(Exception):
    """An argparse error, reported on one line."""


class _Parser(argparse.ArgumentParser):
    """Errors on one line; no abbreviated options (``--val`` is not ``--val-split``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:  # argparse would print the usage and exit
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


_BOOL = argparse.BooleanOptionalAction
# Every training option: dest -> add_argument keywords. Defaults are not set here (SUPPRESS):
# the TrainConfig dataclass holds them, a --config file may change them, flags override both.
_OPTIONS: dict[str, dict[str, Any]] = {
    "data": {
        "metavar": "DIR",
        "help": "image folder (DIR/train/<class>/*, optional DIR/val, DIR/test; or DIR/<class>/*) "
        "or tv:NAME (a torchvision dataset, e.g. tv:Flowers102)",
    },
    "model": {
        "metavar": "NAME",
        "help": "torchvision or timm model name, or pkg.module:factory",
    },
    "weights": {
        "metavar": "{imagenet,none,PATH}",
        "help": "source weights: imagenet (default), none (random) or a weight file",
    },
    "method": {"choices": METHODS, "help": "regularization method (default: delta)"},
    "out": {"metavar": "RUN_DIR", "help": "run directory (must be new unless --resume)"},
    "alpha": {"type": float, "help": "strength of the feature-map / L2-SP term (default: 0.01)"},
    "beta": {"type": float, "help": "strength of the new head's L2 term (default: 0.01)"},
    "lr": {"type": float, "help": "learning rate (default: 0.01)"},
    "head_lr": {"type": float, "help": "learning rate of the new head (default: --lr)"},
    "momentum": {"type": float, "help": "SGD momentum (default: 0.9)"},
    "optimizer": {"choices": ("sgd", "adamw"), "help": "optimizer (default: sgd)"},
    "weight_decay": {"type": float, "help": "weight decay of method l2 (default: 1e-4)"},
    "batch_size": {"type": int, "help": "images per step, per process (default: 32)"},
    "epochs": {"type": int, "help": "epochs (default: 10)"},
    "iterations": {"type": int, "help": "optimizer steps in total, instead of --epochs"},
    "schedule": {
        "choices": ("step", "exponential", "cosine"),
        "help": "per-step lr schedule (default: step, x lr-gamma at --step-at)",
    },
    "step_at": {"type": float, "help": "fraction of training where 'step' decays (default 2/3)"},
    "lr_gamma": {"type": float, "help": "lr decay factor of step/exponential (default: 0.1)"},
    "image_size": {"type": int, "help": "image side in pixels (default: the model's)"},
    "preset": {
        "choices": ("default", "paper"),
        "help": "transforms: the model's pretrained config, or the paper's protocol",
    },
    "hflip": {
        "type": float,
        "metavar": "P",
        "help": "probability of the training flip (default: 0.5; 0 for digits or text)",
    },
    "crop_scale": {
        "type": float,
        "metavar": "S",
        "help": "smallest area share of the default preset's random crop (default: 0.25)",
    },
    "per_class": {"type": int, "metavar": "N", "help": "keep N training images per class"},
    "fraction": {"type": float, "metavar": "F", "help": "keep this fraction of each class"},
    "val_split": {
        "type": float,
        "metavar": "F",
        "help": "hold out this fraction of the training set for validation (default: 0, or the "
        "data's val/ folder)",
    },
    "layers": {
        "metavar": "A,B,C",
        "help": "regularized layers (default: last block of each stage; see `deltaft layers`)",
    },
    "attention": {"metavar": "FILE", "help": "reuse a saved attention file (method delta)"},
    "attention_epochs": {"type": int, "help": "epochs of the attention head (default: 10)"},
    "attention_batches": {"type": int, "help": "batches the attention scores use (default: 4)"},
    "attention_method": {
        "choices": ("exact", "reference", "taylor"),
        "help": "channel scoring: exact (default), reference loop, or taylor (approximate)",
    },
    "temperature": {"type": float, "help": "attention softmax temperature (default: 5)"},
    "bn": {
        "choices": ("adapt", "frozen"),
        "help": "BatchNorm while training the attention head (default: adapt)",
    },
    "reduction": {
        "choices": ("sum", "mean"),
        "help": "batch reduction of the feature-map penalty (default: sum, as the paper)",
    },
    "source_bn": {
        "choices": ("running", "batch"),
        "help": "frozen source's BatchNorm while training: running (default, paper) or batch stats",
    },
    "source_mkldnn": {
        "action": _BOOL,
        "help": "CPU: run the frozen source with oneDNN-packed weights (faster ResNet steps, more "
        "memory; default: off)",
    },
    "head": {"metavar": "NAME", "help": "dotted name of the classifier head (default: found)"},
    "seed": {"type": int, "help": "random seed (default: 0)"},
    "device": {"help": "auto (default), cpu, cuda, cuda:N or mps"},
    "amp": {"choices": ("none", "bf16", "fp16"), "help": "mixed precision on CUDA"},
    "channels_last": {"action": _BOOL, "help": "NHWC memory format on CUDA"},
    "workers": {"type": int, "help": "DataLoader worker processes (default: 2)"},
    "resume": {"action": _BOOL, "help": "continue the run in --out from its last checkpoint"},
    "download": {"action": _BOOL, "help": "let tv:NAME datasets download"},
    "data_root": {"metavar": "DIR", "help": "where tv:NAME datasets live"},
}
_EXCLUSIVE = (("epochs", "iterations"), ("per_class", "fraction"))
_PER_RUN = ("method", "seed", "resume")  # set per run by `compare`
_ATTENTION_KEYS = (
    "data", "model", "weights", "out", "layers", "batch_size", "image_size", "preset", "hflip",
    "crop_scale", "per_class", "fraction", "val_split", "attention_epochs", "attention_batches",
    "attention_method", "temperature", "bn", "head", "seed", "device", "workers", "download",
    "data_root",
)  # fmt: skip


def _add_options(
    parser: argparse.ArgumentParser,
    keys: Sequence[str],
    changes: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Add ``--key`` for each of ``keys`` from :data:`_OPTIONS` (``changes`` edits some)."""
    groups: dict[str, Any] = {}
    for pair in _EXCLUSIVE:
        if all(key in keys for key in pair):
            group = parser.add_mutually_exclusive_group()
            groups.update(dict.fromkeys(pair, group))
    for key in keys:
        target = groups.get(key, parser)
        options = {**_OPTIONS[key], **(changes or {}).get(key, {})}
        target.add_argument(
            "--" + key.replace("_", "-"), dest=key, default=argparse.SUPPRESS, **options
        )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options shared by ``deltaft train`` and ``deltaft compare`` to ``parser``.

    That is ``--config`` and every :class:`~deltaft.app.config.TrainConfig` setting except
    ``--method``, ``--seed`` and ``--resume`` (``compare`` sets them per run), plus
    ``--log-every``. Options left out are absent from the parsed namespace, so that
    :func:`config_from_args` can tell them from defaults.
    """
    parser.add_argument("--config", metavar="FILE.yaml", help="settings file; flags override it")
    _add_options(parser, [key for key in _OPTIONS if key not in _PER_RUN])
    add_log_every_argument(parser)


def add_log_every_argument(parser: argparse.ArgumentParser) -> None:
    """``--log-every N``: progress lines every N steps when stderr is not a terminal."""
    parser.add_argument(
        "--log-every",
        type=int,
        default=20,
        metavar="N",
        help="when stderr is not a terminal, print progress every N steps (default: 20)",
    )


def config_from_args(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    """The :class:`~deltaft.app.config.TrainConfig` of parsed arguments.

    Sources, lowest precedence first: with ``--resume``, the run's own ``config.yaml``; the
    ``--config`` file; the flags given; ``overrides``.

    Raises:
        UserError: a bad file, key or value.
    """
    keys = set(TrainConfig.keys())
    given = {key: value for key, value in vars(args).items() if key in keys}
    sources: list[dict[str, Any]] = []
    if given.get("resume") and given.get("out"):
        stored = RunDir(given["out"]).config_path
        if stored.is_file():
            sources.append(load_config(stored))
    if getattr(args, "config", None):
        sources.append(load_config(args.config))
    return TrainConfig.from_sources(*sources, given, overrides, origin="the command line")


def _add_common(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """-v/-q/--debug/--threads, on the top-level parser and on each subcommand."""
    default: Any = None if top else argparse.SUPPRESS
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=False if top else default,
        help="debug logging",
    )  # fmt: skip
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=False if top else default,
        help="warnings and errors only",
    )  # fmt: skip
    parser.add_argument(
        "--debug", action="store_true", default=False if top else default,
        help="show tracebacks instead of one-line errors",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=default, metavar="N", help="torch CPU threads"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``deltaft`` argument parser with every subcommand."""
    parser = _Parser(
        prog=PROG,
        description="DELTA regularized transfer learning: fine-tune a pretrained CNN on your "
        "images with DELTA or a baseline (l2, l2sp, fm).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser(
        "train",
        help="fine-tune a model on an image folder",
        description="Fine-tune --model on --data with --method; writes RUN_DIR (config.yaml, "
        "metrics.jsonl, checkpoints/, summary.json, figures).",
    )
    add_train_arguments(train)
    _add_options(train, _PER_RUN)
    train.set_defaults(func=_cmd_train)

    attention = sub.add_parser(
        "attention",
        help="estimate DELTA's channel attention and save it",
        description="Train a new head on the frozen source, score every channel of the layers "
        "and save the attention (reuse it with `deltaft train --attention FILE`).",
    )
    attention.add_argument("--config", metavar="FILE.yaml", help="settings file")
    _add_options(
        attention,
        _ATTENTION_KEYS,
        {
            "out": {"metavar": "FILE", "help": "the attention file to write (must not exist)"},
            "batch_size": {"help": "images per batch (default: 32, as the reference)"},
        },
    )
    attention.set_defaults(func=_cmd_attention)

    evaluate = sub.add_parser(
        "eval",
        help="evaluate a run's checkpoint",
        description="Top-1 accuracy and loss of a run's checkpoint on its test (or val) split, "
        "or on --data with the same classes.",
    )
    evaluate.add_argument("--run", required=True, metavar="RUN_DIR", help="the run directory")
    evaluate.add_argument("--data", metavar="DIR", help="other data (default: the run's)")
    evaluate.add_argument("--split", choices=("test", "val"), default="test")
    evaluate.add_argument("--checkpoint", choices=("best", "last"), default="best")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--batch-size", type=int, dest="batch_size")
    evaluate.add_argument("--workers", type=int)
    evaluate.set_defaults(func=_cmd_eval)

    layers = sub.add_parser(
        "layers",
        help="list a model's modules with output shapes; mark the default layers",
        description="Run one forward pass and list every module with its output shape; "
        "'*' marks the layers fm/delta regularize by default.",
    )
    layers.add_argument("--model", required=True, metavar="NAME")
    layers.add_argument("--weights", default="none", help="weights to load (default: none)")
    layers.add_argument("--image-size", type=int, dest="image_size", help="default: the model's")
    layers.add_argument("--all", action="store_true", help="also modules without a tensor output")
    layers.set_defaults(func=_cmd_layers)

    own = set(sub.choices)
    from deltaft.app import compare as _compare
    from deltaft.app import demo as _demo
    from deltaft.app import split as _split

    _compare.add_parser(sub)  # each sets its own func
    _demo.add_parser(sub)
    _split.add_parser(sub)
    for name, subparser in sub.choices.items():
        if name in own or not any(a.dest == "quiet" for a in subparser._actions):
            _add_common(subparser)
    return parser


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------
def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _cmd_train(args: argparse.Namespace) -> int:
    from deltaft.app.train import run_training

    cfg = config_from_args(args)
    info = distributed.init_from_env(cfg.device)
    try:
        if not info.is_main:  # rank 0 speaks for every process
            logger.setLevel(logging.ERROR)
        summary = run_training(cfg, progress=args.progress if info.is_main else None, dist=info)
    finally:
        distributed.shutdown()
    if info.is_main:
        print(f"run: {summary['out']}")
        print(
            f"method {summary['method']}, seed {summary['seed']}, {summary['epochs']} epochs, "
            f"{summary['seconds']:.1f} s"
        )
        if summary["val_accuracy"] is not None:
            best = f"{_percent(summary['best_val_accuracy'])} at epoch {summary['best_epoch']}"
            print(f"val accuracy: {_percent(summary['val_accuracy'])} (best {best})")
        if summary["test_accuracy"] is not None:
            print(f"test accuracy: {_percent(summary['test_accuracy'])}")
        if summary["skipped"]["count"]:
            print(f"skipped {summary['skipped']['count']} unreadable image(s)")
    return 0


def _cmd_attention(args: argparse.Namespace) -> int:
    from deltaft.app.attention import run_attention

    cfg = config_from_args(args, method="delta")
    attention = run_attention(cfg, cfg.out)
    print(f"wrote {cfg.out}")
    for name, weights in attention.weights.items():
        scaled = weights.double() * weights.numel()  # 1 = uniform
        low, high = float(scaled.min()), float(scaled.max())
        print(f"  {name}: {weights.numel()} channels, C*w in [{low:.3f}, {high:.3f}]")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from deltaft.app.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.run,
        data=args.data,
        split=args.split,
        checkpoint=args.checkpoint,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    print(
        f"{result['split']} accuracy {_percent(result['accuracy'])}, loss {result['loss']:.4f} "
        f"({result['images']} images; {result['checkpoint']}.pt, epoch {result['epoch']})"
    )
    return 0


def _cmd_layers(args: argparse.Namespace) -> int:
    from deltaft.app.models import build_model
    from deltaft.layers import default_layers, describe_layers

    model, info = build_model(args.model, weights=args.weights)
    size = args.image_size or info.input_size
    defaults = set(default_layers(model, input_size=size))
    rows = [i for i in describe_layers(model, input_size=size) if args.all or i.shape is not None]
    width = max([len(i.name) for i in rows] + [4])
    kind_width = max([len(i.kind) for i in rows] + [4])
    print(f"  {'name':<{width}}  {'kind':<{kind_width}}  output (C, H, W) for one image")
    for i in rows:
        mark = "*" if i.name in defaults else " "
        shape = "-" if i.shape is None else "x".join(str(s) for s in i.shape[1:])
        print(f"{mark} {i.name:<{width}}  {i.kind:<{kind_width}}  {shape}")
    chosen = ",".join(default_layers(model, input_size=size))
    print(f"* default layers of fm/delta at {size}x{size} (override with --layers): {chosen}")
    return 0


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------
def _error(message: str) -> None:
    _Console.clear_bar(sys.stderr)
    line = " ".join(message.split())
    sys.stderr.write(f"{PROG}: error: {line}\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``deltaft`` command line; returns the exit status.

    0: success; 1: training diverged or a system error; 2: a user error (one line on stderr);
    130: interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as error:
        _error(str(error))
        return 2
    except SystemExit as exit_:  # --help, --version
        return exit_.code if isinstance(exit_.code, int) else 0
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    _configure_logging(level)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_progress = args.quiet or not hasattr(args, "log_every")
    args.progress = None if quiet_progress else ProgressPrinter(every=args.log_every)
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        return int(func(args) or 0)
    except (UserError, ValueError) as error:
        if args.debug:
            raise
        flag = lambda key: "--" + key.replace("_", "-")  # noqa: E731
        _error(error.render(flag) if isinstance(error, SettingError) else str(error))
        return 2
    except NonFiniteLossError as error:
        if args.debug:
            raise
        _error(str(error))
        return 1
    except OSError as error:
        if args.debug:
            raise
        if isinstance(error, FileNotFoundError) and error.filename is None:  # a path the user gave
            _error(str(error))
            return 2
        _error(f"{type(error).__name__}: {error}")
        return 1
    except KeyboardInterrupt as error:  # a TrainingInterrupted says what it saved
        _error(str(error) or "interrupted; continue a training run with --resume.")
        return 130
