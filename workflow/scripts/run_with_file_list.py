"""Runs a command of the project in this process with the rule's list of files as its
arguments. A cohort's list (one path per slide and encoder) grows with the cohort, and
whatever runs a program passes its arguments through exec, whose limit (ARG_MAX, 2 MiB
with the environment on Linux) 20,000 paths of 100 characters reach: PANDA with two
encoders. So rules that take every slide's file call their module through here, not
`shell:`.

The rule gives ``params.module`` (its ``main(argv)`` is run as ``python -m`` would),
``params.files`` and ``params.options`` (the other words); output goes to the terminal
and to ``log[0]``, as ``| tee`` does for the other rules.
"""

import contextlib
import importlib
import sys


class Tee:
    """A text stream that writes to several."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


def run(job) -> None:
    from plumbing.cli import run_cli

    module = importlib.import_module(job.params.module)
    argv = [str(word) for word in (*job.params.files, *job.params.options)]
    with (
        open(job.log[0], "w") as log,
        contextlib.redirect_stdout(Tee(sys.stdout, log)),
        contextlib.redirect_stderr(Tee(sys.stderr, log)),
    ):
        run_cli(module.main, argv)


run(snakemake)  # noqa: F821 (Snakemake defines it for a rule's script)
