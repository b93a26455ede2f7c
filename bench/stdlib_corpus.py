"""A real corpus with known answers: the Python standard library's documentation.

131 modules rendered by pydoc (capped per module, as a docs site's page would be), and
46 questions in a user's words, each answered by one module. The text comes from the
Python that runs the benchmark, so it is the same on every machine of one version.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import pydoc
import warnings

MODULES = (
    "abc argparse array ast asyncio base64 bisect bz2 calendar cmath codecs collections "
    "colorsys configparser contextlib copy csv dataclasses datetime decimal difflib dis "
    "email enum filecmp fnmatch fractions ftplib functools gc getopt getpass gettext glob "
    "gzip hashlib heapq hmac html http imaplib importlib inspect io ipaddress itertools "
    "json keyword linecache locale logging lzma mailbox math mimetypes mmap "
    "multiprocessing netrc numbers operator optparse os pathlib pickle pkgutil platform "
    "plistlib poplib pprint profile pstats pty queue quopri random re reprlib resource "
    "rlcompleter sched secrets select selectors shelve shlex shutil signal site smtplib "
    "socket socketserver sqlite3 ssl stat statistics string stringprep struct subprocess "
    "sys sysconfig tabnanny tarfile tempfile textwrap threading time timeit token tokenize "
    "tomllib trace traceback tracemalloc types typing unicodedata unittest urllib uuid "
    "venv warnings wave weakref webbrowser xml zipapp zipfile zipimport zlib zoneinfo"
).split()

# (question, module that answers it)
QUESTIONS = [
    ("how do I parse command-line options and subcommands", "argparse"),
    ("compute a SHA-256 digest of some bytes", "hashlib"),
    ("message authentication code with a secret key", "hmac"),
    ("read and write gzip compressed files", "gzip"),
    ("bzip2 compression of data", "bz2"),
    ("LZMA xz compression", "lzma"),
    ("heap queue priority queue algorithm", "heapq"),
    ("binary search insertion into a sorted list", "bisect"),
    ("exact decimal floating point arithmetic", "decimal"),
    ("rational numbers with numerator and denominator", "fractions"),
    ("mean median and standard deviation of data", "statistics"),
    ("generate cryptographically strong random tokens", "secrets"),
    ("serialize python objects to a byte stream", "pickle"),
    ("persistent dictionary backed by a database file", "shelve"),
    ("read and write CSV files", "csv"),
    ("parse INI configuration files", "configparser"),
    ("parse TOML files", "tomllib"),
    ("spawn child processes and capture their output", "subprocess"),
    ("copy files and remove whole directory trees", "shutil"),
    ("object-oriented filesystem paths", "pathlib"),
    ("shell-style wildcard matching of file names", "fnmatch"),
    ("create temporary files and directories", "tempfile"),
    ("read and write tar archives", "tarfile"),
    ("work with ZIP archives", "zipfile"),
    ("regular expression matching operations", "re"),
    ("compute differences between sequences of lines", "difflib"),
    ("wrap and fill paragraphs of text", "textwrap"),
    ("split a string using shell-like syntax", "shlex"),
    ("IANA time zone database support", "zoneinfo"),
    ("date and time arithmetic", "datetime"),
    ("measure execution time of small code snippets", "timeit"),
    ("trace memory allocations of a program", "tracemalloc"),
    ("print and format stack traces of exceptions", "traceback"),
    ("write log messages to handlers", "logging"),
    ("thread-based parallelism with locks", "threading"),
    ("process-based parallelism", "multiprocessing"),
    ("asynchronous I/O with an event loop and coroutines", "asyncio"),
    ("low-level networking interface", "socket"),
    ("TLS wrapper for network sockets", "ssl"),
    ("send email through an SMTP server", "smtplib"),
    ("generate universally unique identifiers", "uuid"),
    ("manipulate IPv4 and IPv6 addresses and networks", "ipaddress"),
    ("guess the MIME type of a file from its name", "mimetypes"),
    ("weak references to objects", "weakref"),
    ("classes with automatically generated __init__ and __repr__", "dataclasses"),
    ("enumerations with named constants", "enum"),
]


def render(name: str, cap: int) -> str:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        module = importlib.import_module(name)
        return pydoc.render_doc(module, renderer=pydoc.plaintext)[:cap]


def documents(cap: int = 16000) -> list[dict[str, str]]:
    """One document per module, as npuserve's ingest API takes them."""
    return [{"path": f"{name}.txt", "title": name, "body": render(name, cap)}
            for name in MODULES]


def rank_of(results: list[dict], module: str) -> int | None:
    """1-based rank of the module's document in a search's results, or None."""
    for i, r in enumerate(results, start=1):
        if str(r.get("displayPath", "")).endswith(f"/{module}.txt"):
            return i
    return None
