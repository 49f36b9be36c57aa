"""A task whose metaflow-checkpoint "latest" is broken: it still starts.

Attempt 0 of ``train`` leaves that package's layout behind as a store damaged by hand
would (see ``legacykit``): the task's own latest checkpoint, an archive holding
``state.txt`` twice; and, per ``--scope``, the latest of this step from an earlier run,
either loadable ("good") or holding ``../escaped.txt`` ("broken"), or none ("none"). Then
it fails, and ``@retry`` runs attempt 1 with ``load_policy="eager"``, which prints what it
found in ``current.checkpoint.directory``.
"""

import json
import os
import sys
from pathlib import Path

from metaflow import FlowSpec, Parameter, checkpoint, current, retry, step

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class LegacyBrokenFlow(FlowSpec):
    scope = Parameter("scope", default="good", help="good, broken or none")

    @step
    def start(self):
        self.next(self.train)

    @retry(times=1, minutes_between_retries=0)
    @checkpoint(load_policy="eager", show_card=False)
    @step
    def train(self):
        if current.retry_count == 0:
            self.leave_legacy_layout()
            raise RuntimeError("attempt 0 fails on purpose")
        d = current.checkpoint.directory
        tree = {}
        for dirpath, _dirs, files in os.walk(d):
            for name in files:
                with open(os.path.join(dirpath, name)) as f:
                    tree[os.path.relpath(os.path.join(dirpath, name), d)] = f.read()
        info = current.checkpoint.info
        print(f"RESULT loaded={json.dumps(tree)}")
        loaded = None if info is None else [info["name"], info.get("source")]
        print(f"RESULT info={json.dumps(loaded)}")
        self.next(self.end)

    def leave_legacy_layout(self):
        from legacykit import tar_archive, write_checkpoint

        root = Path(os.environ["METAFLOW_DATASTORE_SYSROOT_LOCAL"]) / ".metaflow"
        where = dict(flow=current.flow_name, step=current.step_name,
                     namespace=current.namespace or f"user:{current.username}")
        write_checkpoint(root, **where, pathspec=current.pathspec, name="mine",
                         archive=tar_archive([("file", "state.txt", b"one"),
                                              ("file", "state.txt", b"two")]),
                         scope_latest=False)
        if self.scope == "none":
            return
        earlier = {"good": [("file", "state.txt", b"from the earlier run")],
                   "broken": [("file", "state.txt", b"x"),
                              ("file", "../escaped.txt", b"x")]}[self.scope]
        write_checkpoint(root, **where, pathspec=f"{current.flow_name}/1/train/2",
                         name="earlier", archive=tar_archive(earlier), task_latest=False)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    LegacyBrokenFlow()
