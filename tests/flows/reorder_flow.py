"""Foreach branches find their own checkpoints of an earlier run, whatever the list order.

Each branch saves the value it trained on; with ``eager``, a later run whose list is
reordered (and holds a duplicate) must load, in every branch, what the branch with the
same value (and the same occurrence of it) saved.
"""

import json
import os

from metaflow import FlowSpec, Parameter, checkpoint, current, step


class ReorderFlow(FlowSpec):
    items = Parameter("items", default='["a", "b", "c", "a"]')

    @step
    def start(self):
        self.values = json.loads(self.items)
        self.next(self.work, foreach="values")

    @checkpoint(load_policy="eager")
    @step
    def work(self):
        path = os.path.join(current.checkpoint.directory, "who.json")
        loaded = None
        if current.checkpoint.is_loaded:
            with open(path) as f:
                loaded = json.load(f)
        print("RESULT branch%d=%s" % (self.index, json.dumps(
            {"value": self.input, "loaded": loaded})))
        occurrence = self.values[: self.index].count(self.input)
        with open(path, "w") as f:
            json.dump({"value": self.input, "occurrence": occurrence, "run": current.run_id}, f)
        current.checkpoint.save()
        self.next(self.join)

    @step
    def join(self, inputs):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    ReorderFlow()
