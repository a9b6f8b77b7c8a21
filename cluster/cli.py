"""The `moe-cluster` command line: the only place that reads the environment (and, with its command
modules, the only code that prints).

Each command's flags and code live in its own module (`*_command(s).py`); this one builds the
parser, runs the command and turns errors into exit codes. User errors (bad flags, a broken
checkpoint, an unsupported config, a bad request) end with one line on stderr and exit code 2;
prompts and completions are never logged.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import torch

from cluster.admin_commands import add_admin_commands
from cluster.arguments import EXIT_FAILURE, EXIT_USAGE, Parser, UsageError, positive_int
from cluster.demo_command import add_demo_model_command
from cluster.deploy import ClusterStartError
from cluster.generate_command import add_generate_command
from cluster.placement import PlacementError
from cluster.planning_commands import add_planning_commands
from cluster.scale_command import add_scale_command, run_scale
from cluster.scaler import ScaleError
from cluster.serve_command import add_serve_command
from mixtral.checkpoint import CheckpointError
from mixtral.config import ConfigError
from router.dispatch import ExpertUnavailableError
from router.engine import RequestError
from router.tokenizer import TokenizerError

__all__ = ["EXIT_FAILURE", "EXIT_USAGE", "UsageError", "build_parser", "main"]

log = logging.getLogger("moe-cluster")

USER_ERRORS = (ConfigError, CheckpointError, TokenizerError, RequestError, PlacementError, ValueError, OSError)
RUNTIME_ERRORS = (ClusterStartError, ExpertUnavailableError, ScaleError)


def build_parser() -> Parser:
    parser = Parser(prog="moe-cluster", description="Serve Mixtral-family MoE models on your own hardware.")
    parser.add_argument("--log-level", default=os.environ.get("MOE_LOG_LEVEL", "WARNING"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="stderr log level")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads for this process (default: every core)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_demo_model_command(commands)
    add_generate_command(commands)
    add_serve_command(commands)
    add_planning_commands(commands, show=print, note=lambda text: print(text, file=sys.stderr))
    add_admin_commands(commands, show=print, note=lambda text: print(text, file=sys.stderr))
    add_scale_command(commands, run=lambda args: run_scale(args, show=print))
    return parser


def _reexec_with_passive_openmp(args: argparse.Namespace) -> None:
    """Run a cluster-backend router with OpenMP threads that sleep while they wait.

    The router spends most of a step waiting for expert hosts; OpenMP's default busy-wait keeps its
    threads spinning on cores the hosts on the same machine need (on 2 cores it cost the cluster
    backend 40% of its decode speed in bench/dispatch.py). The policy is read when torch loads, so
    the command is started again with it set, unless the operator chose a policy.
    """
    if getattr(args, "backend", "local") == "cluster" and "OMP_WAIT_POLICY" not in os.environ:
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        os.execve(sys.executable, [sys.executable, "-m", "cluster.cli", *sys.argv[1:]], env)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if argv is None:  # a real command line, not a call from Python
            _reexec_with_passive_openmp(args)
        logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        return int(args.run(args))
    except UsageError as err:
        print(err, file=sys.stderr)
    except USER_ERRORS as err:
        print(f"moe-cluster: error: {err}", file=sys.stderr)
    except RUNTIME_ERRORS as err:
        print(f"moe-cluster: failed: {err}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
