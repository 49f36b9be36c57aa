"""Foreach branches find their own checkpoints of an earlier run, whatever the list order.

Each branch saves the value it trained on; with ``eager``, a later run whose list is
reordered (and holds a duplicate) must load, in every branch, what the branch with the
same value (and the same occurrence of it) saved.

``--items`` is a Python literal (tuples and dicts with int keys included); with
``--numpy``, its ints become ``np.int64``, as ``np.arange`` gives them.
"""

import ast
import json
import os

from metaflow import FlowSpec, Parameter, checkpoint, current, step


def spelled(value):
    """Python's own spelling: a tuple is not a list, nor an int key a str one."""
    return repr(value.item() if hasattr(value, "item") else value)


class ReorderFlow(FlowSpec):
    items = Parameter("items", default='["a", "b", "c", "a"]')
    numpy = Parameter("numpy", default=False, type=bool)

    @step
    def start(self):
        self.values = ast.literal_eval(self.items)
        if self.numpy:
            import numpy as np

            self.values = [np.int64(v) if type(v) is int else v for v in self.values]
        self.next(self.work, foreach="values")

    @checkpoint(load_policy="eager")
    @step
    def work(self):
        path = os.path.join(current.checkpoint.directory, "who.json")
        loaded = None
        if current.checkpoint.is_loaded:
            with open(path) as f:
                loaded = json.load(f)
        value = spelled(self.input)
        print("RESULT branch%d=%s" % (self.index, json.dumps(
            {"value": value, "loaded": loaded})))
        occurrence = [spelled(v) for v in self.values[: self.index]].count(value)
        with open(path, "w") as f:
            json.dump({"value": value, "occurrence": occurrence, "run": current.run_id}, f)
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
