"""Render npuserve(1) from the CLI's own argparse tree, so the man page and --help cannot
drift apart. Run with the interpreter that has npuserve installed:
    python packaging/manpage.py > npuserve.1"""

from __future__ import annotations

import argparse
import datetime
import sys

from npuserve.daemon.cli import build_parser
from npuserve.daemon.config import FLAT_SCHEMA, env_name

FILES = [
    ("/etc/npuserve/config.toml", "the configuration; every key documented, commented out "
     "at its default (see CONFIGURATION)"),
    ("/var/lib/npuserve/", "state: models/, index.sqlite (the document index), "
     "calibration.json (measured load and per-item costs)"),
    ("/lib/systemd/system/npuserve.service", "the hardened systemd unit"),
    ("/opt/npuserve/", "the self-contained Python environment the package ships"),
]


def esc(text: str) -> str:
    return text.replace("\\", "\\\\").replace("-", "\\-").replace("'", "\\(aq")


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    out = []
    for action in parser._actions:  # argparse has no public walk of its tree
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                sub.description = sub.description or helps.get(name)
                out.append((name, sub))
    return out


def _options(parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
            continue
        names = ", ".join(action.option_strings) or action.dest.upper()
        if action.option_strings and action.nargs != 0:
            names += " " + (action.metavar or action.dest.upper())
        lines += [".TP", f"\\fB{esc(names)}\\fR", esc(action.help or "")]
    return lines


def _commands(parser: argparse.ArgumentParser, prefix: str) -> list[str]:
    lines = []
    for name, sub in _subparsers(parser):
        full = f"{prefix} {name}"
        lines += [".SS " + esc(full), esc(sub.description or ""),
                  ".PP", f"Usage: {esc(sub.format_usage().removeprefix('usage: ').strip())}"]
        lines += _options(sub)
        lines += _commands(sub, full)
    return lines


def render() -> str:
    parser = build_parser()
    date = datetime.date.today().isoformat()
    lines = [f'.TH NPUSERVE 1 "{date}" npuserve "User Commands"', ".SH NAME",
             "npuserve \\- " + esc("LAN model server for retrieval: embeddings, logit rerank "
                                   "and query expansion on an RK3588 NPU with CPU fallback"),
             ".SH SYNOPSIS", "\\fBnpuserve\\fR \\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
             ".SH DESCRIPTION", esc(parser.description or ""), ".SH COMMANDS"]
    lines += _commands(parser, "npuserve")
    lines += [".SH CONFIGURATION", esc("Keys are read from the TOML file, then from NPUSERVE_* "
              "environment variables, then from --set KEY=VALUE; later wins. Every key:")]
    for path, key in FLAT_SCHEMA.items():
        lines += [".TP", f"\\fB{esc(path)}\\fR ({esc(env_name(path))}, default "
                  f"{esc(repr(key.default))})", esc(key.help)]
    lines += [".SH SIGNALS", ".TP", "\\fBSIGTERM\\fR", esc(
        "stop accepting, finish in-flight requests within server.shutdown_timeout, unregister "
        "mDNS, exit 0."), ".TP", "\\fBSIGHUP\\fR", esc(
        "reload the configuration; settings that need a restart are named in the log.")]
    lines += [".SH FILES"]
    for path, what in FILES:
        lines += [".TP", f"\\fI{esc(path)}\\fR", esc(what)]
    lines += [".SH SEE ALSO", "\\fBjournalctl\\fR(1) \\-u npuserve, \\fBsystemctl\\fR(1)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
