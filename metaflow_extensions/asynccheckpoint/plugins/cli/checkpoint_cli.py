"""``python flow.py checkpoint ...``: list, show, download, verify and prune stored checkpoints.

A flow-level command group, as Metaflow's own ``card``, ``logs`` and ``tag`` are: it runs
with the flow's ``--datastore``, ``--datastore-root`` and configuration, so it reads the
store the flow writes to. Metaflow imports this module to list or find any plugin
command, so it holds only the click declarations; the implementation
(:mod:`.checkpoint_commands`) is imported when a command runs.
"""

from __future__ import annotations

from typing import Any

from metaflow._vendor import click

EXIT_CODES = """
\b
Exit codes:
  0  success
  1  a verification or deletion failed, nothing matched, or the store
     could not be read
  2  usage error (a bad option or argument)
"""

PATHSPEC_HELP = (
    "PATHSPEC is RUN, RUN/STEP or RUN/STEP/TASK of this flow (the flow's name may lead: "
    "Flow/RUN/...); without it, the whole flow.")


def _namespace_options(f: Any) -> Any:
    f = click.option("--all-namespaces", is_flag=True, default=False,
                     help="Every namespace (Metaflow's global namespace).")(f)
    f = click.option("--namespace", "namespace", default=None, metavar="NAMESPACE",
                     help="Checkpoints saved in this Metaflow namespace, e.g. user:alice or "
                          "a production token. Default: the current namespace.")(f)
    return f


def _session(obj: Any, namespace: str | None, all_namespaces: bool) -> Any:
    from .checkpoint_finder import Session

    return Session.from_cli(obj, namespace=namespace, all_namespaces=all_namespaces)


def _commands() -> Any:
    from . import checkpoint_commands

    return checkpoint_commands


@click.group()
def cli() -> None:
    pass


@cli.group(help="Commands for the checkpoints @checkpoint stored in this flow's datastore.\n"
                + EXIT_CODES)
def checkpoint() -> None:
    pass


@checkpoint.command(name="list", help="List checkpoints, newest first. " + PATHSPEC_HELP
                    + "\n" + EXIT_CODES)
@click.argument("pathspec", required=False)
@click.option("--name", default=None, help="Only checkpoints saved under this name.")
@click.option("--incomplete", is_flag=True, default=False,
              help="Also list data stored without a manifest: an upload in flight, or the "
                   "debris of one that crashed. No reader ever loads it.")
@click.option("--json", "as_json", is_flag=True, default=False,
              help="One JSON document on stdout, for scripts.")
@_namespace_options
@click.pass_obj
def list_checkpoints(obj: Any, pathspec: str | None, name: str | None, incomplete: bool,
                     as_json: bool, namespace: str | None, all_namespaces: bool) -> None:
    with _session(obj, namespace, all_namespaces) as s:
        _commands().list_checkpoints(s, pathspec, name=name, incomplete=incomplete,
                                     as_json=as_json)


_WHICH_HELP = (
    "CHECKPOINT is a checkpoint id (as `list` shows it), a manifest key, the URL of its "
    "manifest or data (as `show` prints it), or a PATHSPEC (RUN, RUN/STEP or "
    "RUN/STEP/TASK): its newest checkpoint, of --name if given.")


@checkpoint.command(name="card", help="Write the checkpoint card of one attempt of a task to "
                    "FILE (default: checkpoint-card-<run>-<step>-<task>-<attempt>.html) and "
                    "print its path: after retries, Metaflow's `card view` cannot choose "
                    "among the attempts' cards. PATHSPEC is STEP (of the latest run), "
                    "RUN/STEP or RUN/STEP/TASK.\n" + EXIT_CODES)
@click.argument("pathspec")
@click.option("--attempt", type=int, default=None,
              help="The attempt whose card to write. Default: the latest one with a card.")
@click.option("--file", "path", default=None, type=click.Path(dir_okay=False),
              help="Where to write the card's HTML.")
@click.pass_obj
def card(obj: Any, pathspec: str, attempt: int | None, path: str | None) -> None:
    from ..card.view import card_html

    html, attempt, task = card_html(obj.flow.name, pathspec, attempt)
    if path is None:
        path = "checkpoint-card-%s-attempt%d.html" % (task.split("/", 1)[1].replace("/", "-"),
                                                       attempt)
    with open(path, "w") as f:
        f.write(html)
    click.echo(f"The checkpoint card of {task}, attempt {attempt}: {path}")


@checkpoint.command(help="Print a checkpoint's manifest. " + _WHICH_HELP + "\n" + EXIT_CODES)
@click.argument("which", metavar="CHECKPOINT")
@click.option("--name", default=None, help="With a PATHSPEC: the newest of this name.")
@click.option("--json", "as_json", is_flag=True, default=False,
              help="The manifest as JSON on stdout, with its key and URL.")
@_namespace_options
@click.pass_obj
def show(obj: Any, which: str, name: str | None, as_json: bool, namespace: str | None,
         all_namespaces: bool) -> None:
    with _session(obj, namespace, all_namespaces) as s:
        _commands().show(s, which, name=name, as_json=as_json)


@checkpoint.command(help="Copy a checkpoint's files into DIRECTORY, verifying each SHA-256. "
                         "Files land only once every one is verified; files of the same "
                         "name in DIRECTORY are replaced. " + _WHICH_HELP + "\n" + EXIT_CODES)
@click.argument("which", metavar="CHECKPOINT")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", default=None, help="With a PATHSPEC: the newest of this name.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="A progress bar on stderr (shown on a terminal only).")
@_namespace_options
@click.pass_obj
def download(obj: Any, which: str, directory: str, name: str | None, progress: bool,
             namespace: str | None, all_namespaces: bool) -> None:
    with _session(obj, namespace, all_namespaces) as s:
        _commands().download(s, which, directory, name=name, progress=progress)


@checkpoint.command(help="Read stored checkpoints back and check every file's size and "
                         "SHA-256 against its manifest; print each failure and exit 1 if any. "
                         "TARGET is one checkpoint (an id, a manifest key or a URL) or a "
                         "PATHSPEC "
                         "(all its checkpoints); without it, the whole flow.\n" + EXIT_CODES)
@click.argument("target", required=False)
@click.option("--name", default=None, help="Only checkpoints saved under this name.")
@click.option("--json", "as_json", is_flag=True, default=False,
              help="The results as JSON on stdout, for scripts.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="A progress bar on stderr (shown on a terminal only).")
@_namespace_options
@click.pass_obj
def verify(obj: Any, target: str | None, name: str | None, as_json: bool, progress: bool,
           namespace: str | None, all_namespaces: bool) -> None:
    with _session(obj, namespace, all_namespaces) as s:
        _commands().verify(s, target, name=name, as_json=as_json, progress=progress)


@checkpoint.command(help="Delete the checkpoints no retention rule keeps, per scope (a step, "
                         "or one foreach branch of it) under PATHSPEC (RUN or RUN/STEP; "
                         "without it, the whole flow, every run of it, as the output "
                         "lists). The newest checkpoint of a scope, and the one each run's "
                         "retry would resume from, are always kept; data a kept "
                         "checkpoint reads is never deleted. Also removes data no manifest "
                         "commits, and aborts multipart uploads, older than --grace. With "
                         "--dry-run, only says what it would delete and keep, and why. Give "
                         "--keep-last, --keep-best with --best-metric, or both.\n"
                         + EXIT_CODES)
@click.argument("pathspec", required=False)
@click.option("--keep-last", type=click.IntRange(min=1), default=None,
              help="Keep the N newest checkpoints of each scope.")
@click.option("--keep-best", type=click.IntRange(min=1), default=None,
              help="Keep the N best checkpoints by --best-metric.")
@click.option("--best-metric", default=None, metavar="KEY",
              help="The metadata key --keep-best ranks by (a number saved in metadata=).")
@click.option("--best-mode", type=click.Choice(["min", "max"]), default="min",
              show_default=True, help="Whether a smaller or a larger metric is better.")
@click.option("--protect", multiple=True, metavar="CHECKPOINT",
              help="Never delete this checkpoint (repeatable): an id, a manifest key, a URL, "
                   "or a PATHSPEC's newest checkpoint, as `show` takes them. One that "
                   "matches nothing is a usage error, and nothing is deleted.")
@click.option("--grace", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Leave data without a manifest alone until it is this old: it may be an "
                   "upload in flight. Default: METAFLOW_CHECKPOINT_DEBRIS_GRACE (6 hours "
                   "unless set), as for tasks.")
@click.option("--dry-run", is_flag=True, default=False,
              help="Print what would be deleted and kept, and why; delete nothing.")
@click.option("--json", "as_json", is_flag=True, default=False,
              help="The plan (and what was deleted) as JSON on stdout.")
@_namespace_options
@click.pass_obj
def prune(obj: Any, pathspec: str | None, keep_last: int | None, keep_best: int | None,
          best_metric: str | None, best_mode: str, protect: tuple[str, ...],
          grace: float | None, dry_run: bool, as_json: bool, namespace: str | None,
          all_namespaces: bool) -> None:
    with _session(obj, namespace, all_namespaces) as s:
        _commands().prune(s, pathspec, keep_last=keep_last, keep_best=keep_best,
                          best_metric=best_metric, best_mode=best_mode, protect=protect,
                          grace=grace, dry_run=dry_run, as_json=as_json)
