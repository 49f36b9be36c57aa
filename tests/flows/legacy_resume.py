"""The same flow, moved to this package: it loads the references metaflow-checkpoint
returned (passed in as JSON, as an artifact of an earlier run would hold them) and resumes
from that package's checkpoints with load_policy="eager"."""

import json
import os

from metaflow import (
    Checkpoint,
    FlowSpec,
    Parameter,
    checkpoint,
    current,
    load_model,
    model,
    step,
)


def tree(root):
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path) as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


class LegacyTrainFlow(FlowSpec):
    refs = Parameter("refs", help="JSON: references metaflow-checkpoint returned")

    @step
    def start(self):
        r = json.loads(self.refs)
        self.old_model, self.old_file = r["model_dir"], r["model_file"]
        self.old_ckpt = r["ckpt"]
        self.old_key = r["ckpt_tar"]["key"]  # a reference's string form: its key
        self.old_task = r["task"]
        self.next(self.check)

    @checkpoint(load_policy="none")
    @model(load=["old_model", "old_file", ("old_ckpt", None)])
    @step
    def check(self):
        print(f"RESULT model={json.dumps(tree(current.model.loaded['old_model']))}")
        print(f"RESULT file={json.dumps(tree(current.model.loaded['old_file']))}")
        print(f"RESULT ckpt={json.dumps(tree(current.model.loaded['old_ckpt']))}")
        path = current.checkpoint.load(self.old_key)
        print(f"RESULT by_key={json.dumps(tree(path))}")
        listed = Checkpoint().list(task=self.old_task)
        print(f"RESULT listed={json.dumps([(c['name'], c['source']) for c in listed])}")
        self.items = ["a", "b"]
        self.next(self.train, foreach="items")

    @checkpoint(load_policy="eager")
    @step
    def train(self):
        info = current.checkpoint.info
        print(f"RESULT resumed_{self.input}={json.dumps(tree(current.checkpoint.directory))}")
        loaded = None if info is None else [info["name"], info.get("source")]
        print(f"RESULT info_{self.input}={json.dumps(loaded)}")
        self.next(self.join)

    @step
    def join(self, inputs):
        self.old_model = inputs[0].old_model
        self.next(self.end)

    @step
    def end(self):
        target = os.path.join(os.getcwd(), "loaded_in_end")
        load_model(self.old_model, target)
        print(f"RESULT load_model={json.dumps(tree(target))}")


if __name__ == "__main__":
    LegacyTrainFlow()
