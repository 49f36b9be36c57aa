"""@model in the style metaflow-checkpoint documents: save a directory and a file, load
them in a later step by artifact name, and (from outside, as a notebook would) with
load_model."""

import json
import os
import tempfile

from metaflow import FlowSpec, checkpoint, current, load_model, model, step


def tree(root):
    """{relative path: content} of every file under ``root``."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path) as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


class ModelFlow(FlowSpec):
    @checkpoint
    @model
    @step
    def start(self):
        d = tempfile.mkdtemp()
        os.makedirs(os.path.join(d, "tokenizer"))
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({"layers": 2}, f)
        with open(os.path.join(d, "tokenizer", "vocab.txt"), "w") as f:
            f.write("a b c")
        self.my_model = current.model.save(
            d, label="my_model", metadata={"epochs": 10, "learning-rate": 0.001})
        weights = os.path.join(d, "weights.bin")
        with open(weights, "w") as f:
            f.write("w" * 1000)
        self.weights = current.model.save(weights, label="weights", storage_format="files")
        with open(os.path.join(current.checkpoint.directory, "state.txt"), "w") as f:
            f.write("epoch 3")
        self.ckpt = current.checkpoint.save()
        print(f"RESULT saved={json.dumps([self.my_model['key'], self.weights['key']])}")
        self.next(self.evaluate)

    @model(load=["my_model", ("weights", None), "ckpt"])
    @step
    def evaluate(self):
        print(f"RESULT loaded_model={json.dumps(tree(current.model.loaded['my_model']))}")
        print(f"RESULT loaded_weights={json.dumps(tree(current.model.loaded['weights']))}")
        print(f"RESULT loaded_ckpt={json.dumps(tree(current.model.loaded['ckpt']))}")
        print(f"RESULT info={json.dumps(current.model.loaded.info['my_model']['metadata'])}")
        path = current.model.load(self.weights)
        print(f"RESULT load_again={json.dumps(tree(path))}")
        self.next(self.end)

    @step
    def end(self):
        target = tempfile.mkdtemp()
        load_model(self.my_model, target)
        print(f"RESULT load_model={json.dumps(tree(target))}")


if __name__ == "__main__":
    ModelFlow()
