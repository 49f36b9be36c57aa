"""eager resumes from an earlier run of the same step; fresh does not."""

import os

from metaflow import FlowSpec, checkpoint, current, step


def load_and_save(tag):
    path = os.path.join(current.checkpoint.directory, "run")
    if current.checkpoint.is_loaded:
        with open(path) as f:
            print(f"RESULT {tag}={f.read()}")
    else:
        print(f"RESULT {tag}=nothing")
    with open(path, "w") as f:
        f.write(current.run_id)
    current.checkpoint.save()


class EagerFlow(FlowSpec):
    @checkpoint(load_policy="eager")
    @step
    def start(self):
        load_and_save("eager")
        self.next(self.fresh)

    @checkpoint
    @step
    def fresh(self):
        load_and_save("fresh")
        self.next(self.none)

    @checkpoint(load_policy="none")
    @step
    def none(self):
        load_and_save("none")
        self.next(self.end)

    @step
    def end(self):
        print(f"RESULT run_id={current.run_id}")


if __name__ == "__main__":
    EagerFlow()
