"""A flow in metaflow-checkpoint 0.2.14's published style, run with that package (in its own
virtual environment) to leave its layout and references behind for this package to read."""

import json
import os
import tempfile

from metaflow import FlowSpec, checkpoint, current, model, step


class LegacyTrainFlow(FlowSpec):
    @step
    def start(self):
        self.items = ["a", "b"]
        self.next(self.train, foreach="items")

    @model
    @checkpoint(show_card=False)
    @step
    def train(self):
        d = current.checkpoint.directory
        os.makedirs(os.path.join(d, "sub"), exist_ok=True)
        with open(os.path.join(d, "state.txt"), "w") as f:
            f.write(f"epoch 3 of {self.input}")
        with open(os.path.join(d, "sub", "opt.bin"), "w") as f:
            f.write("o" * 300)
        self.ckpt = current.checkpoint.save(metadata={"epoch": 3})
        with open(os.path.join(d, "state.txt"), "w") as f:
            f.write(f"epoch 4 of {self.input}")
        # The newest with latest=True: what a resume loads, stored as one tar archive.
        self.ckpt_tar = current.checkpoint.save(name="tarred", storage_format="tar",
                                                metadata={"epoch": 4})
        m = tempfile.mkdtemp()
        os.makedirs(os.path.join(m, "tok"))
        with open(os.path.join(m, "config.json"), "w") as f:
            f.write(json.dumps({"item": self.input}))
        with open(os.path.join(m, "tok", "vocab.txt"), "w") as f:
            f.write("x y z")
        self.model_dir = current.model.save(m, label="legacy_model", metadata={"acc": 0.9})
        self.model_file = current.model.save(os.path.join(m, "config.json"),
                                             storage_format="files")
        refs = {"ckpt": self.ckpt, "ckpt_tar": self.ckpt_tar, "model_dir": self.model_dir,
                "model_file": self.model_file, "task": current.pathspec}
        print(f"RESULT refs_{self.input}={json.dumps(refs, default=str)}")
        self.next(self.join)

    @step
    def join(self, inputs):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    LegacyTrainFlow()
